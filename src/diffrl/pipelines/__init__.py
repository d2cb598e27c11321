"""One module per system; each exposes a ``Config`` dataclass and ``run(cfg) -> run_dir``."""
