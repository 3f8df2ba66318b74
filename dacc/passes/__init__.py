"""Graph rewrites, one per file, named <verb>_<object>. Their order lives in dacc/compiler/pipeline.py."""
