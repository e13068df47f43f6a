"""The repository speaks for itself: no file cites the workspace's specification file or any other
file the repository does not hold; docs/math.md names every section the code cites; product code,
docs and tests name no development issue."""
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


# A file named in upper case with .md (README.md) is a document; a path under a top folder of the
# repository is a citation of that file. Both must be in the repository.
DOCUMENT = re.compile(r"(?<![\w-])[A-Z][A-Z0-9_]*\.md\b")
REPO_PATH = re.compile(r"(?<![\w./-])(?:docs|benchmarks|vgmr_fast|csrc|tests)/[\w./-]*\w\.(?:md|py|h|cpp|cu|cuh|sh|json|png)\b")


def cited_files_missing(text, tracked):
    """The documents and repository paths ``text`` names that are not in ``tracked``."""
    names = {os.path.basename(p) for p in tracked}
    missing = [m.group(0) for m in DOCUMENT.finditer(text) if m.group(0) not in names]
    return missing + [m.group(0) for m in REPO_PATH.finditer(text) if m.group(0) not in tracked]


def test_the_cited_file_check_can_fail():
    tracked = {"README.md", "docs/math.md"}
    assert cited_files_missing("see docs/math.md §5 and README.md", tracked) == []
    assert cited_files_missing("the rule of RULES.md, docs/rules.md and vgmr_fast/x.py", tracked) == \
        ["RULES.md", "docs/rules.md", "vgmr_fast/x.py"]


def test_every_cited_file_is_in_the_repository():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tracked = set(out.split())
    offenders = []
    for path in _tracked_sources():
        if path == "tests/test_docs.py":
            continue
        with open(os.path.join(ROOT, path), encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                offenders += [f"{path}:{n}: {name}" for name in cited_files_missing(line, tracked)]
    assert not offenders, "cited but not in the repository:\n" + "\n".join(offenders)


def test_no_issue_numbers_in_product_docs_or_tests():
    """Output and docs state measurements and settings; development issues belong to commit messages."""
    r = subprocess.run(["git", "grep", "-niE", r"issue [0-9]+|CONVENTIONS\.md", "--", "vgmr_fast", "csrc", "docs",
                        "benchmarks", "README.md", "tests"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    assert r.stdout == "", "name the measurement or the setting instead:\n" + r.stdout
