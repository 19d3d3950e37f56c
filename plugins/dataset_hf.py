"""Dataset 'hf': a Hugging Face ``datasets`` source, one row's ``text_field`` per document.

``path`` is, in the order it is tried:

- a folder ``Dataset.save_to_disk`` wrote: a ``DatasetDict`` (its splits by name) or one
  ``Dataset`` (read as the split ``train``);
- local data files: parquet, JSON Lines / JSON (gzip too), arrow or csv, as a file, a glob or a
  folder. A file or a glob is the split ``train``; in a folder, ``datasets`` tells the splits
  apart by file name (``train-*.parquet``, ``validation.jsonl``, ...);
- otherwise a dataset on the hub (``roneneldan/TinyStories``), with its ``subset`` (the config
  name ``load_dataset`` takes as ``name``: ``data.dataset``'s own ``name`` key chooses the plugin)
  and its ``revision``; ``streaming: true`` reads it as it downloads instead of caching it first.

Relative local paths start at the experiment file's folder. ``split`` names the training split
and ``val_split``, when set, the source's own validation split. Rows are read in batches of
``BATCH``, never a whole column at once; rows whose text is null are skipped.

The fingerprint of local data is a stamp (path, size, modification time) of every file it reads;
of a hub dataset, its name, subset, revision and splits, and, unless streaming, the fingerprints
``datasets`` gives the loaded splits. Pin ``revision`` to a commit for a hub dataset that may change.
"""
import glob
import os
import re
from typing import Optional

import gptlab
from gptlab import ConfigError, Corpus
from gptlab.errors import did_you_mean, import_extra, one_line

BATCH = 1000  #: rows converted to Python at a time
#: data-file suffix -> the datasets builder that reads it (a compression suffix is looked through)
BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow", ".csv": "csv"}
COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
#: what a hub dataset name looks like: "name" or "owner/name"
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
STRING_TYPES = ("string", "large_string")


def _suffix(name: str) -> str:
    base = name.lower()
    for ending in COMPRESSION:
        if base.endswith(ending):
            base = base[: -len(ending)]
    return os.path.splitext(base)[1]


def _files_under(folder: str) -> list:
    return sorted(p for p in glob.glob(os.path.join(glob.escape(folder), "**", "*"), recursive=True)
                  if os.path.isfile(p) and not os.path.basename(p).startswith("."))



def _is_saved(folder: str) -> bool:
    """Whether ``folder`` is what save_to_disk wrote (a DatasetDict or a Dataset)."""
    return os.path.isfile(os.path.join(folder, "dataset_dict.json")) or \
        os.path.isfile(os.path.join(folder, "state.json"))


def _load_local(datasets, path: str, where: str, matches: list, streaming: bool) -> tuple:
    """(splits, files read, what to call the source in messages) for a local path."""
    if len(matches) == 1 and os.path.isdir(matches[0]):
        folder = matches[0]
        files = _files_under(folder)
        if _is_saved(folder):
            loaded = datasets.load_from_disk(folder)
            splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
            return splits, files, f"the saved dataset {folder}"
        if not any(_suffix(f) in BUILDERS for f in files):
            raise ConfigError(f"path '{path}' is a folder with no data file ({', '.join(BUILDERS)}) and is not a "
                              f"save_to_disk folder (looked in {folder}); fix data.dataset.path")
        return dict(datasets.load_dataset(folder, streaming=streaming)), files, f"the data files in {folder}"
    files = sorted(m for m in matches if os.path.isfile(m))
    kinds = sorted({_suffix(f) for f in files})
    unknown = [k for k in kinds if k not in BUILDERS]
    if not files or unknown:
        what = f"files ending {', '.join(repr(k or '(none)') for k in unknown)}" if files else "no file, only folders"
        raise ConfigError(f"path '{path}' matches {what} (looked for {where}); the hf dataset reads "
                          f"{', '.join(BUILDERS)} files or a save_to_disk folder; fix data.dataset.path")
    builders = sorted({BUILDERS[k] for k in kinds})
    if len(builders) > 1:
        raise ConfigError(f"path '{path}' mixes {' and '.join(builders)} files (looked for {where}); "
                          f"point data.dataset.path at files of one format")
    loaded = datasets.load_dataset(builders[0], data_files={"train": files}, streaming=streaming)
    return dict(loaded), files, f"the files {where}"


def _load_hub(datasets, path: str, shown: str, subset, revision, streaming: bool) -> dict:
    try:
        return dict(datasets.load_dataset(path, subset, revision=revision, streaming=streaming))
    except ConnectionError as exc:
        raise ConfigError(f"this machine cannot reach the Hugging Face hub to load '{path}' "
                          f"({one_line(exc, 120)}; no local file or folder {shown} either); download it where "
                          f"there is network and point data.dataset.path at a save_to_disk folder or data files"
                          ) from None
    except datasets.exceptions.DatasetNotFoundError as exc:
        raise ConfigError(f"no dataset '{path}' on the hub, or it is private or gated ({one_line(exc, 120)}), and "
                          f"no local file or folder {shown}; fix data.dataset.path") from None
    except Exception as exc:  # a config name it does not have, a revision that does not exist, ...
        raise ConfigError(f"datasets cannot load '{path}' from the hub ({one_line(exc, 160, kind=True)}); check "
                          f"data.dataset.path, subset and revision") from None


def _column_kind(feature) -> str:
    dtype = getattr(feature, "dtype", None)
    return str(dtype) if dtype is not None else type(feature).__name__


def _check_column(ds, text_field: str, split: str, source: str) -> None:
    columns = ds.column_names  # None for a streamed dataset whose columns are not known ahead
    if columns is not None and text_field not in columns:
        raise ConfigError(f"split '{split}' of {source} has no column '{text_field}'{did_you_mean(text_field, columns)}"
                          f" (columns: {', '.join(columns)}); set data.dataset.text_field")
    features = ds.features
    if features is not None and text_field in features:
        feature = features[text_field]
        if _column_kind(feature) not in STRING_TYPES:
            raise ConfigError(f"column '{text_field}' of split '{split}' of {source} holds {_column_kind(feature)}, "
                              f"not strings; set data.dataset.text_field to a column of text")


def _documents(ds, text_field: str, split: str, source: str):
    def documents():
        for batch in ds.select_columns([text_field]).iter(batch_size=BATCH):
            for text in batch[text_field]:
                if type(text) is str:
                    yield text
                elif text is not None:  # a streamed source whose types were not known ahead
                    raise ConfigError(f"data.dataset 'hf': column '{text_field}' of split '{split}' of {source} "
                                      f"holds a {type(text).__name__}, not a string; set data.dataset.text_field "
                                      f"to a column of text")

    return documents


def hf(path: str, subset: Optional[str] = None, split: str = "train", val_split: Optional[str] = None,
       text_field: str = "text", streaming: bool = False, revision: Optional[str] = None):
    """A Hugging Face dataset: a hub name, a save_to_disk folder, or parquet/jsonl/json/arrow/csv files
    (a file, glob or folder). split: training split; val_split: the source's own validation split;
    subset: the hub config name."""
    datasets = import_extra("datasets", "this dataset", "datasets")
    if val_split is not None and val_split == split:
        raise ConfigError(f"val_split '{val_split}' is also the training split; name the source's validation split "
                          f"in data.dataset.val_split or drop it (documents are then split by hash)")
    where = gptlab.data_path(path, key="data.dataset.path")
    shown = os.path.abspath(where)
    matches = sorted(glob.glob(where, recursive=True))
    options = f"split={split};val_split={val_split};text_field={text_field}"
    if matches:
        if subset is not None or revision is not None:
            raise ConfigError(f"subset and revision choose a hub dataset's config and commit; '{path}' is local "
                              f"({shown}); drop data.dataset.subset and data.dataset.revision")
        try:
            splits, files, source = _load_local(datasets, path, where, matches, streaming)
        except ConfigError:
            raise
        except Exception as exc:  # a damaged file, a format datasets cannot read
            raise ConfigError(f"datasets cannot read {shown} ({one_line(exc, 160, kind=True)}); "
                              f"fix the files or data.dataset.path") from None
        fingerprint = f"hf-local;{options};{gptlab.file_stamp(files)}"
    else:
        if not HUB_NAME.match(str(path)) or _suffix(str(path)) in BUILDERS:
            raise ConfigError(f"path '{path}' matches no file or folder (looked for {shown}; relative paths start "
                              f"at the experiment file's folder); fix data.dataset.path")
        splits = _load_hub(datasets, path, shown, subset, revision, streaming)
        source = f"'{path}'" + (f" (subset {subset})" if subset else "")
        fingerprint = f"hf-hub;{path};subset={subset};revision={revision};streaming={streaming};{options}"
    chosen = {}
    for key, wanted in (("split", split), ("val_split", val_split)):
        if wanted is None:
            continue
        if wanted not in splits:
            raise ConfigError(f"{key} '{wanted}' is not a split of {source}{did_you_mean(wanted, splits)} "
                              f"(splits: {', '.join(splits) or 'none'}); fix data.dataset.{key}")
        chosen[key] = splits[wanted]
        _check_column(splits[wanted], text_field, wanted, source)
        stamp = getattr(splits[wanted], "_fingerprint", None)
        if not matches and not streaming and stamp:
            fingerprint += f";{key}:{stamp}"
    val = chosen.get("val_split")
    return Corpus(fingerprint=fingerprint, documents=_documents(chosen["split"], text_field, split, source),
                  val_documents=_documents(val, text_field, val_split, source) if val is not None else None)


@gptlab.hookimpl
def gptlab_register(register):
    register("dataset", "hf", hf)
