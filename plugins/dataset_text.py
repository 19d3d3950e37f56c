"""Dataset 'text': local UTF-8 text files, given as a path, a directory or a glob (or a list of them)."""
import glob
import os
from typing import Union

import gptlab
from gptlab import ConfigError, Corpus


def _expand(patterns):
    files = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if os.path.isdir(pattern):
            matches = sorted(p for p in glob.glob(os.path.join(pattern, "**", "*"), recursive=True) if os.path.isfile(p))
        else:
            matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise ConfigError(f"path '{pattern}' matches no file (relative paths start at the current directory); "
                              f"fix data.dataset.path")
        files.extend(matches)
    return files


def text(path: Union[str, list]):
    """Local text files: a path, a directory or a glob such as 'data/*.txt' (or a list of them)."""
    files = _expand(path if isinstance(path, (list, tuple)) else [path])
    stamp = ";".join(f"{os.path.abspath(f)}:{os.path.getsize(f)}:{os.path.getmtime(f)}" for f in files)

    def read():
        return "\n".join(open(f, encoding="utf-8", errors="replace").read() for f in files)

    return Corpus(fingerprint=stamp, read=read)


@gptlab.hookimpl
def gptlab_register(register):
    register("dataset", "text", text)
