"""The Beam curate pipeline and the release build. The only package that imports Beam."""
