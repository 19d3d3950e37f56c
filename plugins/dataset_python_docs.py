"""Dataset 'python_docs': the English reference text that ships with every CPython (pydoc_data).

About 465k characters of prose and grammar from the Python language reference: real English,
present offline wherever gptlab installs, nothing downloaded, nothing committed to the repo.
"""
import hashlib
import sys

import gptlab
from gptlab import ConfigError, Corpus


def _text():
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise ConfigError("this Python has no pydoc_data module; use data.dataset: {name: text, path: FILE}") from exc
    return "\n\n".join(topics[k].strip() for k in sorted(topics)) + "\n"


def _topics():
    from pydoc_data.topics import topics

    return (topics[k].strip() for k in sorted(topics))


def python_docs(documents: bool = False):
    """The Python language reference topics shipped with CPython (~465k chars of English);
    documents: true yields each topic as a document (one text otherwise, as always)."""
    stamp = f"python-{sys.version_info[0]}.{sys.version_info[1]}-{hashlib.sha256(_text().encode()).hexdigest()[:12]}"
    if documents:
        return Corpus(fingerprint=stamp + "-topics", documents=_topics)
    return Corpus(fingerprint=stamp, read=_text)


@gptlab.hookimpl
def gptlab_register(register):
    register("dataset", "python_docs", python_docs)
