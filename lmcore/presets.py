"""The built-in configs and cluster profiles, shipped in the package (lmcore/configs is the
repository's configs/ folder), and the sbatch template.

`--config NAME` and `--cluster NAME` take a built-in name or a path to a YAML file: a path
that exists wins, a name is looked up here, anything else is one line listing the names.
"""

from __future__ import annotations

from pathlib import Path

from lmcore.errors import ConfigError, LmcoreError

CONFIGS = Path(__file__).resolve().parent / "configs"
PROFILES = CONFIGS / "slurm"
SBATCH_TEMPLATE = Path(__file__).resolve().parent / "slurm" / "lmcore.sbatch"


def names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def describe(path: Path) -> str:
    """A built-in file's one-line summary: its first comment line."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def find(spec: str, folder: Path, what: str, error: type[LmcoreError] = ConfigError) -> Path:
    """A YAML path, or the built-in NAME in folder."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise error(f"{what} file {spec} is {'a folder' if path.is_dir() else 'not a regular file'}; pass a "
                    "YAML file")
    looks_like_a_path = "/" in spec or spec.endswith((".yaml", ".yml"))
    builtin = folder / f"{spec}.yaml"
    if not looks_like_a_path and builtin.is_file():
        return builtin
    known = ", ".join(names(folder))
    if looks_like_a_path:
        raise error(f"{what} file {spec} does not exist; pass an existing YAML file or a built-in name "
                    f"({known})")
    raise error(f"unknown built-in {what} {spec!r}; the built-in ones are {known} (`lmcore configs` says "
                "what each is for), or pass a path to a YAML file")


def config_path(spec: str) -> Path:
    return find(spec, CONFIGS, "config")


def profile_path(spec: str, error: type[LmcoreError] = ConfigError) -> Path:
    return find(spec, PROFILES, "cluster profile", error)


def listing() -> str:
    """What `lmcore configs` prints."""
    lines = ["built-in configs (--config NAME):"]
    lines += [f"  {n:<14} {describe(CONFIGS / f'{n}.yaml')}" for n in names(CONFIGS)]
    lines += ["cluster profiles (--cluster NAME):"]
    lines += [f"  {n:<14} {describe(PROFILES / f'{n}.yaml')}" for n in names(PROFILES)]
    lines += [f"(the files: {CONFIGS}; start your own from one: lmcore config --config NAME > mine.yaml)"]
    return "\n".join(lines) + "\n"
