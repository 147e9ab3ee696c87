"""The committed records under results/ name no machine's absolute paths: a record must not depend on the
machine that made it (paths are relative to the run folder or the repository, or a placeholder)."""
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
# an absolute path of a home, work, temp or install folder (POSIX or Windows), not part of a relative path
ABSOLUTE = re.compile(r"(?<![\w.~<>-])(/home/|/work/|/tmp/|/root/|/Users/|/opt/|/private/|/mnt/|/var/folders/)"
                      r"|(?<![\w])[A-Za-z]:(\\\\|\\|/)(Users|Windows|home|work|tmp|Temp|Program)")


def absolute_paths(folder):
    """['file:line: path…'] of every absolute machine path in the text files under folder."""
    hits = []
    for f in sorted(Path(folder).rglob("*")):
        if not f.is_file():
            continue
        try:
            text = f.read_bytes().decode()
        except UnicodeDecodeError:
            continue                                    # a PNG, a safetensors: not a text record
        for i, line in enumerate(text.splitlines(), 1):
            m = ABSOLUTE.search(line)
            if m:
                hits.append(f"{f.relative_to(folder)}:{i}: {line[m.start():m.start() + 60]}")
    return hits


def test_results_hold_no_absolute_paths():
    hits = absolute_paths(RESULTS)
    assert not hits, f"{len(hits)} absolute machine paths under results/ (use a relative path or <placeholder>):\n" \
                     + "\n".join(hits[:20])


def test_the_scan_finds_planted_paths(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text('{"model": "../shared/m",\n "out": "/root/keep/runs/x"}\n')
    (tmp_path / "log.txt").write_text("ok <tmp>/a\nsaved C:\\Users\\me\\run\nfile /home/u/x and /tmp/y\n")
    (tmp_path / "w.json").write_text('{"a": "C:\\\\Users\\\\me", "b": "results/x", "c": "https://x.org/home/"}\n')
    (tmp_path / "img.png").write_bytes(b"\x89PNG\xff\xfe/home/u/")
    assert [h.split(": ")[0] for h in absolute_paths(tmp_path)] == ["log.txt:2", "log.txt:3", "run/config.json:2",
                                                                     "w.json:1"]
