"""The math lives in the repository: no file cites the workspace's specification file; docs/math.md exists and
names every section the code cites."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_SUFFIXES = (".py", ".cpp", ".h", ".cu", ".cuh", ".md", ".sh")


def _tracked_sources():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [p for p in out.split() if p.endswith(SOURCE_SUFFIXES) and not p.startswith("benchmarks/results/")]


def test_no_file_cites_the_workspace_spec():
    offenders = []
    for path in _tracked_sources():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if re.search(r"\bSPEC\b", line) and path != "tests/test_docs.py":
                    offenders.append(f"{path}:{n}")
    assert not offenders, "cite docs/math.md instead of SPEC: " + ", ".join(offenders)


def test_every_cited_section_exists_in_docs_math():
    with open(os.path.join(ROOT, "docs", "math.md"), encoding="utf-8") as f:
        math = f.read()
    sections = set(re.findall(r"^## (§\d+a?)", math, flags=re.M))
    cited = set()
    for path in _tracked_sources():
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            cited |= set(re.findall(r"docs/math\.md (§\d+a?)", f.read()))
    assert cited, "nothing cites docs/math.md"
    assert cited <= sections, f"cited but missing from docs/math.md: {sorted(cited - sections)}"
