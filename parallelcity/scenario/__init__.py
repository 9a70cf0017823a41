"""Scenario files: their typed definition, loading and the text a journal keeps."""
