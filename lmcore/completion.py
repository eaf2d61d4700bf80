"""Shell completion for bash and zsh, as a static script: `eval "$(lmcore completion bash)"`.

The script is generated once from the command line's own parser and the config's dataclasses
(commands, their options, built-in config and profile names, every `section.key=`, and the
choices of keys that have them), so completing costs no Python start-up: `lmcore --help` and a
TAB stay as fast as the shell. zsh runs the same function through bashcompinit.
"""

from __future__ import annotations

import argparse
import shlex
import typing
from typing import Literal

from lmcore import presets
from lmcore.config import Config
from lmcore.schema import leaf_paths

SUBMIT_OPTIONS = ("--cluster --config --dry-run --shards --wait --timeout --json --grid --points --dir "
                  "--parallel --help")
SUBMIT_KINDS = "train eval generate pipeline sweep"


def _choices() -> dict[str, list[str]]:
    """The values of keys that have a fixed set of them (choices and true/false)."""
    out: dict[str, list[str]] = {}
    for key in leaf_paths(Config):
        section, name = key.split(".")
        cls = typing.get_type_hints(Config)[section]
        tp = typing.get_type_hints(cls)[name]
        if typing.get_origin(tp) is Literal:
            out[key] = [str(c) for c in typing.get_args(tp)]
        elif tp is bool:
            out[key] = ["true", "false"]
    return out


def _options(parser: argparse.ArgumentParser) -> dict[str, str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    return {name: " ".join(o for a in p._actions for o in a.option_strings)  # noqa: SLF001
            for name, p in sub.choices.items()}


def bash(parser: argparse.ArgumentParser) -> str:
    options = _options(parser)
    keys = " ".join(f"{k}=" for k in leaf_paths(Config))
    options["submit"] = SUBMIT_OPTIONS  # its own parser (lmcore/slurm/cli.py)
    cases = "\n".join(f"        {name}) opts={shlex.quote(opts)} ;;" for name, opts in options.items())
    values = "\n".join(f"        {k}) COMPREPLY=($(compgen -W {shlex.quote(' '.join(v))} -- \"$cur\"));"
                       " return ;;" for k, v in _choices().items())
    configs, profiles = (shlex.quote(" ".join(presets.names(f))) for f in (presets.CONFIGS, presets.PROFILES))
    return f"""# lmcore completion for bash (lmcore completion bash); zsh: lmcore completion zsh
_lmcore() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}" opts=""
    local commands={shlex.quote(" ".join(options))}
    if [[ $COMP_CWORD -eq 1 ]]; then
        COMPREPLY=($(compgen -W "$commands --help --version" -- "$cur")); return
    fi
    # bash splits "key=value" at "=": complete the value of a key with choices
    if [[ "$prev" == "=" && $COMP_CWORD -ge 2 ]]; then
        case "${{COMP_WORDS[COMP_CWORD-2]}}" in
{values}
        esac
        return
    fi
    case "$prev" in
        --config|-c) COMPREPLY=($(compgen -W {configs} -- "$cur") $(compgen -f -- "$cur")); return ;;
        --cluster) COMPREPLY=($(compgen -W {profiles} -- "$cur") $(compgen -f -- "$cur")); return ;;
        --points) COMPREPLY=($(compgen -f -- "$cur")); return ;;
        --checkpoint|--out|--dir|report|verify) COMPREPLY=($(compgen -d -- "$cur")); return ;;
        completion) COMPREPLY=($(compgen -W "bash zsh" -- "$cur")); return ;;
        submit) COMPREPLY=($(compgen -W {shlex.quote(SUBMIT_KINDS)} -- "$cur")); return ;;
    esac
    case "${{COMP_WORDS[1]}}" in
{cases}
    esac
    if [[ "$cur" == --* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [[ " train eval generate config submit sweep " == *" ${{COMP_WORDS[1]}} "* ]]; then
        COMPREPLY=($(compgen -W {shlex.quote(keys)} -- "$cur"))
        [[ ${{#COMPREPLY[@]}} -eq 1 && "${{COMPREPLY[0]}}" == *= ]] && compopt -o nospace 2>/dev/null
    fi
}}
complete -F _lmcore lmcore
"""


def zsh(parser: argparse.ArgumentParser) -> str:
    return ("# lmcore completion for zsh: the bash function, through bashcompinit\n"
            "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n"
            + bash(parser))


def script(shell: str, parser: argparse.ArgumentParser) -> str:
    return bash(parser) if shell == "bash" else zsh(parser)
