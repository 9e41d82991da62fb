"""Dependency audit for CI: fails on a known vulnerability, in any installed distribution, that has a fix.

    .venv/bin/python scripts/audit_deps.py

1. pip-audit over the installed set (PyPI's per-release advisories; `--service osv` for OSV's database).
2. Where pip-audit cannot reach its database (a machine that sees only PyPI's project pages, e.g. behind an
   index mirror), each unaudited distribution is checked against its project page
   (https://pypi.org/pypi/NAME/json), whose advisories are those of the latest release: exact when the
   installed version is the latest, and otherwise the distribution is reported as not audited.
Exit status: 1 when a vulnerability with a fixed version applies, 0 otherwise; every advisory found and
every distribution left unaudited is printed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import subprocess
import sys
import urllib.request

PROJECT_JSON = "https://pypi.org/pypi/{name}/json"


def installed() -> dict[str, str]:
    out = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out[name.lower().replace("_", "-")] = dist.version
    return out


def run_pip_audit(service: str) -> dict:
    """pip-audit's JSON report of the installed distributions (editable installs, i.e. colbert-jax, skipped)."""
    cmd = [sys.executable, "-m", "pip_audit", "-f", "json", "--progress-spinner", "off", "--skip-editable"]
    proc = subprocess.run([*cmd, "--vulnerability-service", service], capture_output=True, text=True, timeout=600)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        sys.exit(f"audit: pip-audit failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")


def latest_release_advisories(name: str) -> tuple[str, list[dict]] | None:
    """(latest version, its advisories) from PyPI's project page; None when unreachable."""
    try:
        with urllib.request.urlopen(PROJECT_JSON.format(name=name), timeout=30) as r:
            data = json.load(r)
    except OSError:
        return None
    return data["info"]["version"], [v for v in data.get("vulnerabilities") or [] if not v.get("withdrawn")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--service", default="pypi", choices=["pypi", "osv"], help="pip-audit's database")
    args = parser.parse_args()
    versions = installed()
    report = run_pip_audit(args.service)
    fixable, unfixed, unaudited, by_pip_audit, by_page = [], [], [], 0, 0
    for dep in report["dependencies"]:
        name = dep["name"].lower().replace("_", "-")
        if "skip_reason" not in dep:
            by_pip_audit += 1
            for v in dep.get("vulns", []):
                (fixable if v.get("fix_versions") else unfixed).append(
                    (name, dep["version"], v["id"], v["fix_versions"])
                )
            continue
        if name not in versions or name == "colbert-jax":  # this project (an editable install), not a dependency
            continue
        page = latest_release_advisories(name)
        if page is None or page[0] != versions[name]:
            latest = "unreachable" if page is None else f"latest {page[0]}"
            unaudited.append(f"{name} {versions[name]} ({latest})")
            continue
        by_page += 1
        for v in page[1]:
            (fixable if v.get("fixed_in") else unfixed).append((name, versions[name], v["id"], v.get("fixed_in")))
    for name, version, vid, fixes in fixable:
        print(f"audit: {name} {version}: {vid}, fixed in {', '.join(fixes)}")
    for name, version, vid, _ in unfixed:
        print(f"audit: {name} {version}: {vid} (no fixed version yet)")
    if unaudited:
        print(f"audit: not audited (no advisory database reachable for these versions): {', '.join(unaudited)}")
    print(
        f"audit: {by_pip_audit} distributions audited by pip-audit ({args.service}), {by_page} by their PyPI "
        f"project page, {len(unaudited)} not audited; {len(fixable)} vulnerabilities with a fix"
    )
    return 1 if fixable else 0


if __name__ == "__main__":
    sys.exit(main())
