"""One module per `capfilt` subcommand: options in, one Python call out."""
