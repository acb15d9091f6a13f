"""Weight files on disk: safetensors headers and byte ranges (safetensors_io.py), an HF dir's shards and the
staged, atomically published output dir (hf_files.py). The lowest layer: models/ and convert/ both read
through it, it imports nothing else of mmtune."""
