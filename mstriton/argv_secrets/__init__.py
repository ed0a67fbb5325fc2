"""Secrets given to a program as placeholders on its command line and as values in its environment (see
argv_secrets.c): `ps` and /proc/PID/cmdline, which every local user can read, show only the placeholders.

    env = with_secrets(os.environ, "tritonserver", {"MSTRITON_SECRET_ADMIN": key})
    subprocess.Popen([tritonserver, f"--http-restricted-api=...={placeholder('MSTRITON_SECRET_ADMIN')}"], env=env)
"""

from __future__ import annotations

from pathlib import Path

LIBRARY = Path(__file__).resolve().with_name("libargv_secrets.so")
PROGRAM_VARIABLE = "MSTRITON_SECRET_ARGS_PROGRAM"


def placeholder(variable: str) -> str:
    """What stands on the command line for the value of $variable."""
    return f"@mstriton-secret:{variable}@"


def available() -> bool:
    return LIBRARY.is_file()


def with_secrets(env: dict[str, str], program: str, secrets: dict[str, str]) -> dict[str, str]:
    """`env` for running `program` (the basename of the executable that finally runs: a shell wrapper in between
    passes the placeholders on untouched) with `secrets` (variable -> value) filled into its placeholders."""
    if not available():
        raise FileNotFoundError(f"{LIBRARY} is missing: run `make -C {LIBRARY.parent}` (tools/install.sh does)")
    preload = " ".join(p for p in (str(LIBRARY), env.get("LD_PRELOAD", "")) if p)
    return {**env, **secrets, "LD_PRELOAD": preload, PROGRAM_VARIABLE: program}
