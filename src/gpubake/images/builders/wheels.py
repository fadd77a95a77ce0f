"""Where each file of a lock comes from, and the lock split for the host's `pip download`.

A lock names its sources in pip's own syntax (`--index-url`, `--extra-index-url`,
`--find-links` lines), so `pip install -r` of it works anywhere with internet: the demo's
`torch==2.13.0+cpu` is on PyTorch's CPU index, everything else on PyPI. A pin with a local
version label (`+cpu`, `+cu128`) is never on PyPI (PyPI refuses local versions), so it
comes from the lock's extra indexes; every other pin from its index (PyPI).

Why split the download: pip asks every index for every requirement, and a machine that
has the extra index's files in a local wheel folder but cannot reach the index itself
(this project's CI) would wait out pip's retries once per requirement (~8 s each, ~17
min for the demo's 128). Downloading the local-version pins with the extra indexes and
the rest without them costs such a machine one failed lookup, and changes nothing
elsewhere: the hashes decide which file is accepted, not the index that served it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_OPTION = re.compile(r"^(--index-url|-i|--extra-index-url|--find-links|-f)(?:\s+|=)(\S+)$")
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*(?P<version>[^\s;\\]+)")


@dataclass
class LockSources:
    """A lock's source options and its requirement entries (each a logical line, hashes included)."""

    index_url: str | None = None
    extra_index_urls: list[str] = field(default_factory=list)
    find_links: list[str] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)  # "name==version --hash=... ..."

    @staticmethod
    def is_local(entry: str) -> bool:
        """A pin with a local version label (`torch==2.13.0+cpu`): never on PyPI."""
        match = _PIN.match(entry)
        return bool(match and "+" in match["version"])

    def pins(self) -> list[tuple[str, str]]:
        """(name, version) of every entry."""
        out = []
        for entry in self.entries:
            match = _PIN.match(entry)
            if match:
                out.append((match["name"].lower(), match["version"]))
        return out

    def source_of(self, entry: str) -> list[str]:
        """The indexes (or folders) the lock names for `entry`."""
        if self.is_local(entry):
            return [*self.extra_index_urls, *self.find_links]
        return [self.index_url or "https://pypi.org/simple", *self.find_links]

    def options(self, *, extra: bool) -> list[str]:
        lines = [f"--index-url {self.index_url}"] if self.index_url else []
        if extra:
            lines += [f"--extra-index-url {url}" for url in self.extra_index_urls]
        lines += [f"--find-links {link}" for link in self.find_links]
        return lines

    def split(self) -> tuple[str, str] | None:
        """(local-version pins with the extra indexes, the rest without them) as requirement
        files' text; None when nothing needs splitting."""
        local = [e for e in self.entries if self.is_local(e)]
        if not local or not self.extra_index_urls:
            return None
        public = [e for e in self.entries if not self.is_local(e)]
        return ("\n".join(self.options(extra=True) + local) + "\n",
                "\n".join(self.options(extra=False) + public) + "\n" if public else "")


def parse_lock(text: str) -> LockSources:
    """The source options and requirement entries of a pip requirements file (comments dropped)."""
    out = LockSources()
    buf = ""
    logical: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            line = ""
        line = line.split(" #", 1)[0].strip()
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            logical.append(" ".join(buf.split()))
        buf = ""
    if buf.strip():
        logical.append(" ".join(buf.split()))
    for line in logical:
        option = _OPTION.match(line)
        if option:
            flag, value = option.groups()
            if flag in ("--index-url", "-i"):
                out.index_url = value
            elif flag == "--extra-index-url":
                out.extra_index_urls.append(value)
            else:
                out.find_links.append(value)
        elif not line.startswith("-"):
            out.entries.append(line)
    return out
