"""Dataset 'text': local UTF-8 text files, given as a path, a directory or a glob (or a list of them).

Without ``documents`` the files are read whole and joined by newlines, as they always were. With
``documents`` they are streamed as documents: each ``file``, each ``line``, each ``paragraph``
(text between blank lines), or the text between occurrences of any other string given as the
separator (TinyStories' ``<|endoftext|>``). Documents are read a line at a time; a paragraph's or a
separated document's surrounding whitespace is dropped, and empty documents are skipped.
"""
import glob
import os
from typing import Optional, Union

import gptlab
from gptlab import ConfigError, Corpus



def _expand(patterns):
    files = []
    for pattern in patterns:
        where = gptlab.data_path(pattern)
        if os.path.isdir(where):
            matches = sorted(p for p in glob.glob(os.path.join(where, "**", "*"), recursive=True) if os.path.isfile(p))
        else:
            matches = sorted(glob.glob(where, recursive=True))
        if not matches:
            raise ConfigError(f"path '{pattern}' matches no file (looked for {where}; relative paths start at the "
                              f"experiment file's folder); fix data.dataset.path")
        files.extend(matches)
    return files


def _split(files, mode):
    """Documents of ``mode`` (line, paragraph or a separator string), read a line at a time."""
    for name in files:
        with open(name, encoding="utf-8", errors="replace") as fh:
            doc = []
            for line in fh:
                if mode == "line":
                    if line.strip():
                        yield line.rstrip("\r\n")
                    continue
                if mode == "paragraph":
                    pieces = [line, ""] if not line.strip() else [line]
                else:
                    pieces = line.split(mode)
                doc.append(pieces[0])
                for piece in pieces[1:]:  # a document ends before each separator
                    text = "".join(doc).strip()
                    if text:
                        yield text
                    doc = [piece]
            text = "".join(doc).strip()
            if text:
                yield text


def text(path: Union[str, list], documents: Optional[str] = None):
    """Local text files: a path, a directory or a glob such as 'data/*.txt' (or a list of them).
    documents: file | line | paragraph | a separator string; unset: the files are one text."""
    files = _expand(path if isinstance(path, (list, tuple)) else [path])
    stamp = ";".join(f"{os.path.abspath(f)}:{os.path.getsize(f)}:{os.path.getmtime(f)}" for f in files)
    if documents is None:
        def read():
            return "\n".join(open(f, encoding="utf-8", errors="replace").read() for f in files)

        return Corpus(fingerprint=stamp, read=read)
    if not isinstance(documents, str) or not documents:
        raise ConfigError(f"data.dataset.documents must be file, line, paragraph or a separator string such as "
                          f"'<|endoftext|>', got {documents!r}")

    def each_file():
        for name in files:
            with open(name, encoding="utf-8", errors="replace") as fh:
                yield fh.read()

    if "\n" in documents:
        raise ConfigError(f"data.dataset.documents: a separator is looked for within each line, so it cannot hold "
                          f"a newline (got {documents!r}); use paragraph for blank-line separated text")
    stream = each_file if documents == "file" else (lambda: _split(files, documents))
    return Corpus(fingerprint=f"{stamp};documents={documents}", documents=stream)


@gptlab.hookimpl
def gptlab_register(register):
    register("dataset", "text", text)
