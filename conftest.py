"""Root pytest configuration: report how many notebook cells nbval validated."""

from __future__ import annotations


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    notebooks = set()
    for outcome in counts:
        for report in terminalreporter.stats.get(outcome, []):
            path = report.nodeid.split("::", 1)[0]
            if path.endswith(".ipynb") and report.when in ("call", "setup"):
                if outcome != "skipped" and report.when == "setup":
                    continue
                counts[outcome] += 1
                notebooks.add(path)
    total = sum(counts.values())
    if total:
        terminalreporter.write_line(
            f"nbval: {counts['passed']} notebook cells validated against their stored outputs "
            f"in {len(notebooks)} notebooks ({counts['failed']} failed, {counts['skipped']} skipped)"
        )
