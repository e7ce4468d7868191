"""tools/system-deps.sh, which `make test` and .ci/run call before pytest: it installs the Debian packages
the tests need as root on Debian, and elsewhere names the missing ones in one line. Run here with PATH
arranged (fake commands in a temporary directory), so nothing is installed or removed for real."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.harness import ROOT

SCRIPT = ROOT / "tools" / "system-deps.sh"
# Each package, and the commands the script looks for to know it is there.
COMMANDS = {
    "curl": ("curl",),
    "prometheus": ("prometheus", "promtool"),
    "wrk": ("wrk",),
    "nginx": ("nginx",),
    "chromium": ("chromium",),
    "redis-server": ("redis-server",),
    "postgresql": ("initdb", "postgres"),
    "tinyproxy": ("tinyproxy",),
    "docker-compose": ("docker-compose",),
    "nodejs": ("node",),
    "npm": ("npm",),
}


def _fake(bin_dir: Path, name: str, body: str = "exit 0") -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _run(tmp_path: Path, present: set[str], uid: int, apt: bool, *args: str) -> subprocess.CompletedProcess[str]:
    """The script with only `present`'s commands, `id -u` answering `uid`, and a recording apt-get when
    `apt` (its `install` creates the commands of the packages it is given)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for package in present:
        for command in COMMANDS[package]:
            _fake(bin_dir, command)
    _fake(bin_dir, "id", f"echo {uid}")
    if apt:
        creates = " ".join(f'{p}) for c in {" ".join(COMMANDS[p])}; do make_fake "$c"; done ;;' for p in COMMANDS)
        _fake(
            bin_dir,
            "apt-get",
            f'echo "$*" >> {tmp_path}/apt.log\n'
            f'make_fake() {{ printf "#!/bin/sh\\nexit 0\\n" > {bin_dir}/"$1"; /bin/chmod +x {bin_dir}/"$1"; }}\n'
            f'if [ "$1" = install ]; then for p in "$@"; do case "$p" in {creates} esac; done; fi',
        )
    env = {"PATH": str(bin_dir), "SYSTEM_DEPS_DIRS": ""}
    return subprocess.run(["/bin/bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=30)


def _apt_log(tmp_path: Path) -> list[str]:
    log = tmp_path / "apt.log"
    return log.read_text().splitlines() if log.exists() else []


def test_nothing_missing_is_silent_success(tmp_path: Path) -> None:
    result = _run(tmp_path, set(COMMANDS), uid=1000, apt=False)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize(("uid", "apt"), [(1000, True), (0, False)], ids=["not-root", "not-debian"])
def test_elsewhere_it_names_the_missing_packages_in_one_line(tmp_path: Path, uid: int, apt: bool) -> None:
    result = _run(tmp_path, {"curl", "nodejs", "nginx", "postgresql"}, uid, apt)
    assert result.returncode == 1 and result.stdout == ""
    missing = "prometheus wrk chromium redis-server tinyproxy docker-compose nodejs npm"  # npm alone is not enough
    assert result.stderr == (
        f"tools/system-deps.sh: the tests need these Debian packages: {missing} "
        f"(install them: apt-get install {missing}, or run this script as root on Debian)\n"
    )
    assert _apt_log(tmp_path) == []


def test_as_root_on_debian_it_installs_only_what_is_missing(tmp_path: Path) -> None:
    result = _run(tmp_path, set(COMMANDS) - {"wrk", "tinyproxy"}, uid=0, apt=True)
    assert result.returncode == 0, result.stderr
    assert _apt_log(tmp_path) == ["update -qq", "install -y -qq --no-install-recommends wrk tinyproxy"]
    again = _run(tmp_path, set(), uid=0, apt=True)  # now everything is there: apt-get is not run again
    assert again.returncode == 0 and len(_apt_log(tmp_path)) == 2


def test_check_only_reports_even_as_root(tmp_path: Path) -> None:
    result = _run(tmp_path, set(COMMANDS) - {"docker-compose"}, 0, True, "--check")
    assert result.returncode == 1 and "packages: docker-compose (" in result.stderr
    assert _apt_log(tmp_path) == []


def test_this_machine_has_every_package() -> None:
    # `make test` ran the script before this test: what it needs is installed, or the run stopped there.
    result = subprocess.run(["/bin/bash", str(SCRIPT), "--check"], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr) == (0, "")


def test_make_test_runs_the_script_before_pytest() -> None:
    result = subprocess.run(["make", "-n", "test"], capture_output=True, text=True, cwd=ROOT, timeout=30)
    commands = result.stdout.splitlines()
    script = next(i for i, line in enumerate(commands) if "tools/system-deps.sh" in line)
    assert script < next(i for i, line in enumerate(commands) if "-m pytest" in line)
