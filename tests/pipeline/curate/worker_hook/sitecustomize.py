"""Imported at start-up by the processes of test_portable.py's SDK worker pool (this directory
leads their PYTHONPATH). While the file named by ``CAPFILT_TEST_HOLD`` exists, a worker that
reaches the Rank stage writes its pid to ``<that file>.pid`` and waits there, so that the test
can kill it mid-run; without the file the stage runs as usual."""
import os

_HOLD = os.environ.get("CAPFILT_TEST_HOLD")
if _HOLD:
    import time

    from capfilt.pipeline.curate import inference

    _infer = inference.RankHandler.infer

    def _held_infer(self, batch, model):
        if os.path.exists(_HOLD):
            with open(_HOLD + ".tmp", "w") as f:
                f.write(str(os.getpid()))
            os.replace(_HOLD + ".tmp", _HOLD + ".pid")
            while os.path.exists(_HOLD):
                time.sleep(0.05)
        return _infer(self, batch, model)

    inference.RankHandler.infer = _held_infer
