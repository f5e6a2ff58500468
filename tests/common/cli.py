"""Test helper shared by every topic: the command-line flags of a Config."""

import dataclasses


def cli_args(cfg, base_cfg, preset: str | None = None) -> list[str]:
    """Command-line flags that turn the defaults (or `--preset preset`, `base_cfg`) into
    exactly `cfg`."""
    args = [] if preset is None else ["--preset", preset]
    for f in dataclasses.fields(cfg):
        v, d = getattr(cfg, f.name), getattr(base_cfg, f.name)
        if v == d:
            continue
        flag = f.name.replace("_", "-")
        if isinstance(v, bool):
            args.append(f"--{flag}" if v else f"--no-{flag}")
        elif isinstance(v, tuple):
            args += [f"--{flag}", *map(str, v)]
        else:
            args += [f"--{flag}", str(v)]
    return args
