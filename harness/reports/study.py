"""Studies: question-specific analyses that plug into the generic `report` command.

The harness's own reports are generic (slopes, crossovers, compare, figures). A study asks a
question of a run, e.g. whether a paper's claims hold, and answers with tables. It is one
module (or package) of the top-level `studies` package, which `run_bench.py` imports before a
report or quality command, that registers its sections function::

    @register_study("fmmformer")
    def sections(run: Run) -> list[Section]:
        return [Section("Claim check", claim_table(run.df), caption="holds: ...")]

`report` prints each section of each study for each run and writes them to `<study>.md` in the
run's directory; with `--readme` the run's README part links to that file. A study may also
add options to `report` (`report_options(parser)`, then `before_report(runs, args)` runs first),
its own subcommands (`commands(subparsers)`, each setting `func`), and sections of its own to
the quality report of a run on real inputs (`quality_sections(run)`) and to the report of a
trained-task run (`task_sections(run)`), each printed and written into that report's README
part after the report's own tables.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.reports.data import CONFIG, Run
from harness.reports.tables import drop_constant, markdown_table, rich_table


@dataclass(frozen=True)
class Section:
    """One part of a study's answer: a table with a title and a caption, markdown text, and
    figures (image files)."""

    title: str
    table: pd.DataFrame | None = None
    caption: str = ""
    markdown: str = ""
    figures: tuple[Path, ...] = ()

    def as_markdown(self, base: Path) -> str:
        """The section under a `###` heading; figures linked relative to the directory `base`."""
        body = markdown_table(drop_constant(self.table, CONFIG)) if self.table is not None else ""
        parts = [f"### {self.title}", self.caption, body, self.markdown.strip(),
                 *figure_links(self.figures, base)]
        return "\n\n".join(p for p in parts if p) + "\n"


def figure_links(figures: tuple[Path, ...], base: Path) -> list[str]:
    """Markdown images of `figures`, each named by its file stem and linked relative to `base`."""
    return [f"![{p.stem}]({Path(os.path.relpath(p, base)).as_posix()})" for p in figures]


@dataclass(frozen=True)
class Study:
    """A registered study: its sections per run and its optional command-line hooks."""

    name: str
    sections: Callable[[Run], list[Section]]
    report_options: Callable[[argparse.ArgumentParser], None] | None = None
    before_report: Callable[[list[Run], argparse.Namespace], None] | None = None
    commands: Callable[[argparse._SubParsersAction], None] | None = None
    quality_sections: Callable[[Run], list[Section]] | None = None
    task_sections: Callable[[Run], list[Section]] | None = None

    def file(self, run: Run) -> Path:
        """Where `report` writes this study's sections for `run`."""
        return run.dir / f"{self.name}.md"


_STUDIES: dict[str, Study] = {}


def register_study(name: str, **hooks) -> Callable:
    """Decorator registering a study's sections function under `name` (one per study).

    `hooks`: `report_options`, `before_report`, `commands`, `quality_sections`,
    `task_sections` (see the module docstring).
    """
    def decorator(sections: Callable[[Run], list[Section]]) -> Callable:
        if name in _STUDIES:
            raise ValueError(f"study '{name}' is already registered")
        _STUDIES[name] = Study(name, sections, **hooks)
        return sections

    return decorator


def unregister_study(name: str) -> None:
    """Remove a study (tests use this)."""
    _STUDIES.pop(name, None)


def all_studies() -> list[Study]:
    """Every registered study, by name."""
    return [_STUDIES[name] for name in sorted(_STUDIES)]


def study_sections(run: Run, hook: str) -> list[Section]:
    """The sections the registered studies' `hook` (`quality_sections` or `task_sections`)
    gives for `run`, study by study; studies without that hook give none."""
    return [section for study in all_studies() if (sections := getattr(study, hook))
            for section in sections(run)]


def section_lines(part: Section, readme_dir: Path) -> list[str]:
    """A study's section as README lines: its title in bold before its caption (a section
    without a caption continues the one before it and shows no title), its table, its
    markdown, its figures."""
    lines = [f"**{part.title}** {part.caption}", ""] if part.caption else []
    if part.table is not None:
        lines += [markdown_table(part.table), ""]
    if part.markdown.strip():
        lines += [part.markdown.strip(), ""]
    for link in figure_links(part.figures, readme_dir):
        lines += [link, ""]
    return lines


def print_sections(out, sections: list[Section]) -> None:
    """Print a study's tables on a rich console (markdown-only sections are left to its file)."""
    for section in sections:
        if section.table is not None:
            out.print(rich_table(drop_constant(section.table, CONFIG), title=section.title,
                                 caption=section.caption or None))


def write_sections(study: Study, run: Run, sections: list[Section]) -> Path:
    """Write a study's sections for `run` to its markdown file; returns the path."""
    path = study.file(run)
    text = f"## {study.name}: {run.name}\n\n" + "\n".join(s.as_markdown(path.parent)
                                                          for s in sections)
    path.write_text(text)
    return path
