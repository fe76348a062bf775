"""Rebuild `kjv.txt.gz`, the `sample` corpus, from Debian's `bible-kjv` package.

    apt-get install bible-kjv && python -m data_prep.corpora.build_kjv

The King James Version is in the public domain. One document per chapter (its verses, one per
line, without verse numbers); documents separated by <|endoftext|> as in TinyStories.
"""

from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path

from data_prep.files import atomic_output

VERSE = re.compile(r"^(?P<book>\w+?)(?P<chapter>\d+):(?P<verse>\d+) (?P<text>.*)$")


def main() -> None:
    raw = subprocess.run(
        ["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    chapters: list[list[str]] = []
    current = None
    for line in raw.splitlines():
        match = VERSE.match(line)
        if match is None:  # a verse continued on the next line
            chapters[-1][-1] += " " + line.strip()
            continue
        key = (match["book"], match["chapter"])
        if key != current:
            chapters.append([])
            current = key
        chapters[-1].append(match["text"].strip())
    text = "\n<|endoftext|>\n".join("\n".join(verses) for verses in chapters) + "\n"
    out = Path(__file__).with_name("kjv.txt.gz")
    # mtime=0 and the final name in the gzip header: the same bytes on every rebuild
    with (
        atomic_output(out) as tmp,
        open(tmp, "wb") as raw,
        gzip.GzipFile(str(out), "wb", compresslevel=9, fileobj=raw, mtime=0) as f,
    ):
        f.write(text.encode("utf-8"))
    print(f"{out}: {len(chapters)} chapters, {len(text):,} characters")


if __name__ == "__main__":
    main()
