"""The hypernetwork files a user has: listing, name resolution, hashes, user metadata and a cache.

Host-free: the WebUI extension and the standalone app give it their folders. Files are ``.pt`` and
``.safetensors`` anywhere below the folders. A name from a prompt resolves, in this order, as a
relative path (``sub/name``), an exact file stem, a file name with its suffix (``name.pt``), a unique
case-insensitive stem, an alias from the user metadata, then a (short) sha256 prefix. Nothing ever resolves outside the folders: ``..``,
absolute paths and symlinks leading out are refused.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .atomic import atomic_write_bytes
from .errors import (
    FileFormatError,
    HypernetworkError,
    InvalidConfigError,
    NonFiniteWeightsError,
    NoSuchNetworkError,
    PathEscapeError,
    TagError,
    UnknownNetworkError,
)
from .families import CONTEXT_WIDTHS, FAMILIES, widths_fit
from .formats import load as load_file
from .hashing import file_sha256, short_hash
from .network import Hypernetwork
from .regular_files import open_regular
from .strength import Strength
from .syntax import TAG_TYPE, TagSpec, parse_tag

SUFFIXES = (".safetensors", ".pt")
_HASH_LIKE = re.compile(r"[0-9a-fA-F]{8,64}")
_ALIAS_FORBIDDEN = re.compile(r"[:<>,/\\]")
_USER_METADATA_LIMIT = 16 << 20
# Real prompts use a handful; each tag costs a lookup over every file and, applied, time at every step,
# so a prompt of 10,000 tags would hold a generation queue for minutes.
MAX_TAGS = 64
_CACHE_VERSION = 2
_CACHE_VERSIONS_WITHOUT_NAN_CHECK = (1,)  # their summaries may describe a file with NaN weights as usable


@dataclass(frozen=True)
class NetworkEntry:
    """One file: its stem, where it is and what it looked like when listed."""

    name: str
    path: str
    root: str
    relpath: str  # from its folder, "/"-separated, without the suffix: "styles/anime"
    suffix: str
    size: int
    mtime: float

    @property
    def file_format(self) -> str:
        return self.suffix[1:]

    @property
    def metadata_path(self) -> str:
        """A1111's user-metadata file: the file's path with ``.json`` instead of its suffix."""
        return os.path.splitext(self.path)[0] + ".json"

    @property
    def key(self) -> tuple[str, int, float]:
        return (self.path, self.size, self.mtime)


@dataclass
class Resolution:
    entry: NetworkEntry
    how: str  # "path", "name", "case-insensitive name", "alias", "hash"
    note: str | None = None


@dataclass
class PlannedNetwork:
    network: Hypernetwork
    strength: Strength
    entry: NetworkEntry
    mentioned: str  # the name as written in the prompt
    short_hash: str | None


@dataclass
class ActivationPlan:
    networks: list[PlannedNetwork] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    names_not_found: bool = False  # a tag named no file: a refreshed listing may find it

    @property
    def entries(self) -> list[tuple[Hypernetwork, Strength]]:
        return [(item.network, item.strength) for item in self.networks]

    @property
    def hashes(self) -> dict[str, str]:
        return {item.mentioned: item.short_hash for item in self.networks if item.short_hash}


def fit_problem(network: Hypernetwork, context_width: int | None, self_widths: Iterable[int]) -> str | None:
    """Why a network does not fit a model with these attention widths, or None when it does."""
    if context_width is None:
        return None
    self_widths = list(self_widths)
    if widths_fit(network.widths, context_width, self_widths):
        return None
    model = CONTEXT_WIDTHS.get(context_width)
    model_label = model.label if model else f"a model with {context_width}-wide text context"
    family = network.family
    network_label = FAMILIES[family].label if family in FAMILIES else "another model"
    return (
        f"is made for {network_label} (widths {', '.join(map(str, network.widths))}) and does not fit {model_label} "
        f"(widths {context_width}, {', '.join(map(str, self_widths))})"
    )


def preferred_multiplier_of(user_metadata: dict) -> float | None:
    """The card's "preferred weight" (A1111's name), None when unset, zero or not a number."""
    try:
        value = float(user_metadata.get("preferred weight"))
    except (TypeError, ValueError):
        return None
    return value if value != 0 else None


class _Cache:
    """sha256 and summary of each file, keyed by path and checked against size and mtime; kept on disk."""

    def __init__(self, path: str | None):
        self.path = path
        self.files: dict[str, dict] = {}
        self._dirty = False
        self.deferring = 0  # > 0: saves wait for the end of a listing (Library.deferred_cache_writes)
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as handle:
                    data = json.load(handle)
                version = data.get("version") if isinstance(data, dict) else None
                if version == _CACHE_VERSION or version in _CACHE_VERSIONS_WITHOUT_NAN_CHECK:
                    self.files = {k: v for k, v in data.get("files", {}).items() if isinstance(v, dict)}
                if version in _CACHE_VERSIONS_WITHOUT_NAN_CHECK:
                    for record in self.files.values():
                        record.pop("info", None)  # hashes stay valid; summaries are made again
            except (OSError, ValueError):
                self.files = {}  # a damaged cache is rebuilt, never trusted

    def get(self, entry: NetworkEntry, field_name: str):
        record = self.files.get(entry.path)
        if not record or record.get("size") != entry.size or record.get("mtime") != entry.mtime:
            return None
        return record.get(field_name)

    def put(self, entry: NetworkEntry, field_name: str, value) -> None:
        record = self.files.get(entry.path)
        if not record or record.get("size") != entry.size or record.get("mtime") != entry.mtime:
            record = {"size": entry.size, "mtime": entry.mtime}
            self.files[entry.path] = record
        record[field_name] = value
        self._dirty = True

    def save(self) -> None:
        if not self.path or not self._dirty or self.deferring:
            return
        data = json.dumps({"version": _CACHE_VERSION, "files": self.files}, indent=1, sort_keys=True)
        try:
            atomic_write_bytes(self.path, data.encode("utf-8"), overwrite=True)
            self._dirty = False
        except OSError:
            pass  # a read-only cache location only costs recomputing hashes


class Library:
    """The networks below a set of folders, with an LRU of loaded networks.

    ``folders`` is a list or a callable returning one (so a host setting can change it);
    ``cache_size`` is how many loaded networks are kept besides those in use.
    """

    def __init__(
        self,
        folders: Sequence[str] | Callable[[], Sequence[str]],
        *,
        cache_size: int = 4,
        cache_file: str | None = None,
        loader: Callable[[str], Hypernetwork] = load_file,
    ):
        self._folders = folders
        self.cache_size = max(0, int(cache_size))
        self._loader = loader
        self._cache = _Cache(cache_file)
        self._entries: list[NetworkEntry] | None = None
        self._loaded: OrderedDict[tuple, Hypernetwork] = OrderedDict()
        self._pinned: set[tuple] = set()
        self._lock = threading.RLock()

    # -- folders and listing ------------------------------------------------------------------
    def folders(self) -> list[str]:
        """The configured folders that exist, absolute, without duplicates, in order."""
        raw = self._folders() if callable(self._folders) else self._folders
        seen, result = set(), []
        for folder in raw:
            if not folder:
                continue
            absolute = os.path.abspath(os.path.expanduser(str(folder)))
            real = os.path.realpath(absolute)
            if real in seen or not os.path.isdir(absolute):
                continue
            seen.add(real)
            result.append(absolute)
        return result

    def refresh(self) -> list[NetworkEntry]:
        entries, seen = [], set()
        for root in self.folders():
            for entry in _scan(root):
                real = os.path.realpath(entry.path)
                if real not in seen:
                    seen.add(real)
                    entries.append(entry)
        with self._lock:
            self._entries = entries
        return list(entries)

    @property
    def entries(self) -> list[NetworkEntry]:
        if self._entries is None:
            self.refresh()
        return list(self._entries or [])

    # -- name resolution -----------------------------------------------------------------------
    def resolve(self, name: str) -> Resolution:
        """Find the file a prompt name means; raises UnknownNetworkError or PathEscapeError."""
        text = str(name).strip()
        if not text:
            raise UnknownNetworkError("an empty name matches no hypernetwork")
        if _looks_like_path(text):
            return Resolution(self._resolve_path(text), "path")
        entries = self.entries
        exact = [e for e in entries if e.name == text]
        if exact:
            return _pick(exact, text, "name")
        with_suffix = [e for e in entries if e.name + e.suffix == text]
        if with_suffix:
            return _pick(with_suffix, text, "name")
        folded = [e for e in entries if e.name.lower() == text.lower()]
        if len(folded) == 1:
            return Resolution(folded[0], "case-insensitive name")
        if len(folded) > 1:
            raise UnknownNetworkError(
                f"{text!r} matches {_listing(folded)} only by letter case; write the exact name or sub/name"
            )
        by_alias = self._resolve_alias(text, entries)
        if by_alias is not None:
            return by_alias
        if _HASH_LIKE.fullmatch(text):
            by_hash = self.find_by_hash(text)
            if len(by_hash) == 1:
                return Resolution(by_hash[0], "hash")
            if len(by_hash) > 1:
                raise UnknownNetworkError(f"hash {text!r} matches {_listing(by_hash)}; give more characters")
        raise NoSuchNetworkError(self._unknown_message(text, entries))

    def _resolve_alias(self, text: str, entries: list[NetworkEntry]) -> Resolution | None:
        aliases = [(e, str(self.user_metadata(e).get("alias") or "").strip()) for e in entries]
        exact = [e for e, alias in aliases if alias and alias == text]
        if not exact:
            exact = [e for e, alias in aliases if alias and alias.lower() == text.lower()]
        if len(exact) == 1:
            return Resolution(exact[0], "alias")
        if len(exact) > 1:
            raise UnknownNetworkError(f"alias {text!r} is used by {_listing(exact)}; make the aliases unique")
        return None

    def _resolve_path(self, text: str) -> NetworkEntry:
        parts = [part for part in re.split(r"[\\/]+", text) if part not in ("", ".")]
        if os.path.isabs(text) or re.match(r"^[A-Za-z]:", text) or text.startswith(("/", "\\")):
            raise PathEscapeError(f"{text!r} is an absolute path; names are relative to the hypernetwork folders")
        if ".." in parts:
            raise PathEscapeError(f"{text!r} climbs out of the hypernetwork folders with '..'")
        if not parts:
            raise UnknownNetworkError(f"{text!r} names no file")
        folders = self.folders()
        for root in folders:
            for candidate in _candidates(os.path.join(root, *parts)):
                if not os.path.isfile(candidate):
                    continue
                real_root = os.path.realpath(root)
                if not _inside(os.path.realpath(candidate), real_root):
                    raise PathEscapeError(f"{text!r} is a link that leads outside the hypernetwork folders")
                return self._entry_for(candidate, root)
        raise NoSuchNetworkError(self._unknown_message(text, self.entries))

    def _entry_for(self, path: str, root: str) -> NetworkEntry:
        absolute = os.path.abspath(path)
        for entry in self.entries:
            if entry.path == absolute:
                return entry
        return _make_entry(absolute, root)

    def searched_folders(self) -> str:
        """Where names are looked up, for messages ("in A, B (C does not exist)"); missing folders are named too."""
        raw = self._folders() if callable(self._folders) else self._folders
        existing = self.folders()
        missing = list(dict.fromkeys(str(f) for f in raw if f and not os.path.isdir(os.path.expanduser(str(f)))))
        gone = f"{', '.join(missing)} {'does' if len(missing) == 1 else 'do'} not exist" if missing else ""
        if not existing:
            return f"(searched nothing: {gone or 'no hypernetwork folder is configured'})"
        return f"in {', '.join(existing)}" + (f" ({gone})" if gone else "")

    def _unknown_message(self, text: str, entries: list[NetworkEntry]) -> str:
        names = sorted(set(distinct_names(entries)) | {e.name for e in entries})
        close = difflib.get_close_matches(text, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return f"no hypernetwork named {text!r} {self.searched_folders()}{hint}"

    # -- hashes --------------------------------------------------------------------------------
    def cached_sha256(self, entry: NetworkEntry) -> str | None:
        return self._cache.get(entry, "sha256")

    def sha256(self, entry: NetworkEntry) -> str:
        cached = self.cached_sha256(entry)
        if cached:
            return cached
        digest = file_sha256(entry.path)
        with self._lock:
            self._cache.put(entry, "sha256", digest)
            self._cache.save()
        return digest

    def short_hash(self, entry: NetworkEntry) -> str:
        return short_hash(self.sha256(entry))

    def find_by_hash(self, prefix: str) -> list[NetworkEntry]:
        wanted = prefix.lower()
        found = []
        with self.deferred_cache_writes():
            for entry in self.entries:
                try:
                    digest = self.sha256(entry)
                except (HypernetworkError, OSError):
                    continue  # deleted or made unreadable since the folders were listed: it matches nothing
                if digest.startswith(wanted):
                    found.append(entry)
        return found

    @contextlib.contextmanager
    def deferred_cache_writes(self):
        """Write the disk cache once at the end of a loop over many files, not once per file."""
        with self._lock:
            self._cache.deferring += 1
        try:
            yield
        finally:
            with self._lock:
                self._cache.deferring -= 1
                self._cache.save()

    # -- user metadata -------------------------------------------------------------------------
    def user_metadata(self, entry: NetworkEntry) -> dict:
        """The user's notes on a file (A1111's ``<file>.json``); {} when absent, unreadable, not a
        regular file (a FIFO there would hang the cards page) or over 16 MiB."""
        try:
            with open_regular(entry.metadata_path) as handle:
                text = handle.read(_USER_METADATA_LIMIT + 1)
            data = json.loads(text) if len(text) <= _USER_METADATA_LIMIT else None
        except (HypernetworkError, OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_user_metadata(self, entry: NetworkEntry, updates: Mapping[str, object]) -> dict:
        """Merge ``updates`` into the user metadata and write it atomically; returns the new content."""
        clean = {key: _clean_metadata_value(key, value, entry) for key, value in updates.items()}
        alias = clean.get("alias")
        if alias:
            for other in self.entries:
                if other.path != entry.path and (
                    other.name == alias or self.user_metadata(other).get("alias") == alias
                ):
                    raise InvalidConfigError(f"alias {alias!r} is already the name or alias of {other.relpath}")
        data = {**self.user_metadata(entry), **clean}
        text = json.dumps(data, indent=4, ensure_ascii=False)
        atomic_write_bytes(entry.metadata_path, text.encode("utf-8"), overwrite=True)
        return data

    def preferred_multiplier(self, entry: NetworkEntry) -> float | None:
        return preferred_multiplier_of(self.user_metadata(entry))

    # -- loading -------------------------------------------------------------------------------
    def load(self, entry: NetworkEntry) -> Hypernetwork:
        """The network of a file, from the in-memory cache when the file has not changed."""
        with self._lock:
            network = self._loaded.get(entry.key)
            if network is not None:
                self._loaded.move_to_end(entry.key)
                return network
        network = self._loader(entry.path)
        with self._lock:
            self._loaded[entry.key] = network
            self._evict()
        return network

    def pin(self, entries: Iterable[NetworkEntry]) -> None:
        """Keep these loaded while in use (they do not count against the cache size)."""
        with self._lock:
            self._pinned = {entry.key for entry in entries}
            self._evict()

    def set_cache_size(self, size: int) -> None:
        with self._lock:
            self.cache_size = max(0, int(size))
            self._evict()

    def loaded_keys(self) -> list[tuple]:
        with self._lock:
            return list(self._loaded)

    def _evict(self) -> None:
        unpinned = [key for key in self._loaded if key not in self._pinned]
        for key in unpinned[: max(0, len(unpinned) - self.cache_size)]:
            del self._loaded[key]

    # -- what a card or the API shows ------------------------------------------------------------
    def info(self, entry: NetworkEntry) -> dict:
        """A summary of the network (cached per file version); ``error`` says why it cannot load."""
        cached = self._cache.get(entry, "info")
        if cached is not None:
            return dict(cached)
        try:
            summary = network_summary(self.load(entry))
        except NonFiniteWeightsError as exc:
            summary = {"error": str(exc), "non_finite_weights": exc.count, "parameters": exc.total}
        except HypernetworkError as exc:
            summary = {"error": str(exc)}
        summary["format"] = entry.file_format
        with self._lock:
            self._cache.put(entry, "info", summary)
            self._cache.save()
        return dict(summary)

    def describe(self, entry: NetworkEntry, *, compute_hash: bool = True) -> dict:
        """Everything the API and the cards show about one file."""
        sha = self.sha256(entry) if compute_hash else self.cached_sha256(entry)
        return {
            "name": entry.name,
            "path": entry.path,
            "relative_path": entry.relpath,
            "folder": entry.root,
            "format": entry.file_format,
            "size": entry.size,
            "mtime": entry.mtime,
            "sha256": sha,
            "short_hash": short_hash(sha) if sha else None,
            "metadata": self.info(entry),
            "user_metadata": self.user_metadata(entry),
        }

    # -- from tags to networks -----------------------------------------------------------------
    def plan(
        self,
        tags: Iterable[Sequence[object]],
        *,
        default_multiplier: float = 1.0,
        model_blocks: Sequence[str] | None = None,
        presets: Mapping[str, Sequence[float]] | None = None,
        context_width: int | None = None,
        self_widths: Iterable[int] = (),
        force_mismatch: bool = False,
        with_hashes: bool = True,
    ) -> ActivationPlan:
        """Parse, resolve, load and check each tag; a bad tag becomes a problem, the rest still apply.
        Only the first :data:`MAX_TAGS` tags are used."""
        plan = ActivationPlan()
        self_widths = list(self_widths)
        tags = list(tags)
        for items in tags[:MAX_TAGS]:
            try:
                spec = parse_tag(
                    items, default_multiplier=default_multiplier, model_blocks=model_blocks, presets=presets
                )
                planned, note = self._plan_one(spec, with_hashes)
            except HypernetworkError as exc:
                missing = self._missing_name(items) if isinstance(exc, TagError) else None
                plan.problems.append(f"{exc}; {missing}" if missing else str(exc))
                plan.names_not_found |= isinstance(exc, NoSuchNetworkError) or missing is not None
                continue
            if note:
                plan.notes.append(f"{spec.text}: {note}")
            problem = fit_problem(planned.network, context_width, self_widths)
            if problem and not force_mismatch:
                plan.problems.append(f"{spec.text}: skipped: {planned.entry.relpath} {problem}")
                continue
            if problem:
                plan.notes.append(f"{spec.text}: applied although {planned.entry.relpath} {problem}")
            plan.networks.append(planned)
        if len(tags) > MAX_TAGS:
            plan.problems.append(
                f"{len(tags) - MAX_TAGS:,} more <{TAG_TYPE}:...> tags were ignored: one generation uses at most {MAX_TAGS}"
            )
        self.pin(item.entry for item in plan.networks)
        return plan

    def _missing_name(self, items: Sequence[object]) -> str | None:
        """For a malformed tag, whether its name is unknown too: one message then says both,
        so fixing the argument does not merely reveal the next problem."""
        name = str(items[0]).strip() if items else ""
        if not name or "=" in name:
            return None
        try:
            self.resolve(name)
        except NoSuchNetworkError as exc:
            return f"also, {exc}"
        except HypernetworkError:
            return None
        return None

    def _plan_one(self, spec: TagSpec, with_hashes: bool) -> tuple[PlannedNetwork, str | None]:
        try:
            resolution = self.resolve(spec.name)
        except HypernetworkError as exc:
            raise type(exc)(f"{spec.text}: {exc}") from None
        try:
            network = self.load(resolution.entry)
        except HypernetworkError as exc:
            raise FileFormatError(f"{spec.text}: cannot load: {exc}") from None
        hash_value = self.short_hash(resolution.entry) if with_hashes else None
        planned = PlannedNetwork(network, spec.strength, resolution.entry, spec.name, hash_value)
        return planned, resolution.note


def network_summary(network: Hypernetwork) -> dict:
    arch = network.architecture
    info = network.info
    family = network.family
    return {
        "internal_name": network.name,
        "widths": network.widths,
        "layer_structure": [float(f) for f in arch.layer_structure],
        "activation": arch.activation,
        "activate_output": bool(arch.activate_output),
        "layer_norm": bool(arch.is_layer_norm),
        "dropout_structure": [float(p) for p in arch.dropout_structure],
        "weight_initialization": arch.weight_initialization,
        "step": int(network.step),
        "sd_checkpoint": info.sd_checkpoint,
        "sd_checkpoint_name": info.sd_checkpoint_name,
        "family": family,
        "family_declared": info.model_family is not None,
        "parameters": network.parameter_count(),
        "optional_info": info.optional_info,
    }


def _scan(root: str) -> list[NetworkEntry]:
    real_root = os.path.realpath(root)
    found = []
    for directory, subdirs, files in os.walk(root, followlinks=False):
        subdirs.sort(key=str.lower)
        for filename in sorted(files, key=str.lower):
            if not filename.lower().endswith(SUFFIXES):
                continue
            path = os.path.join(directory, filename)
            if not os.path.isfile(path) or not _inside(os.path.realpath(path), real_root):
                continue  # broken links and links leading out of the folder are not listed
            found.append(_make_entry(path, root))
    return found


def _make_entry(path: str, root: str) -> NetworkEntry:
    stat = os.stat(path)
    base, suffix = os.path.splitext(path)
    relpath = os.path.relpath(base, root).replace(os.sep, "/")
    return NetworkEntry(
        name=os.path.basename(base),
        path=os.path.abspath(path),
        root=root,
        relpath=relpath,
        suffix=suffix.lower(),
        size=stat.st_size,
        mtime=stat.st_mtime,
    )


def _candidates(base: str) -> list[str]:
    if base.lower().endswith(SUFFIXES):
        return [base]
    return [base + suffix for suffix in SUFFIXES]


def _inside(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith("..") or bool(re.match(r"^[A-Za-z]:", text))


def _pick(matches: list[NetworkEntry], text: str, how: str) -> Resolution:
    """Several files share a stem: the shallowest, then alphabetically first, with a note saying
    which name picks each of them."""
    ordered = sorted(matches, key=lambda e: (e.relpath.count("/"), e.relpath.lower(), e.suffix))
    note = None
    if len(ordered) > 1:
        names = distinct_names(ordered)
        if len(names) == len(ordered):
            how_to_choose = f"write {' or '.join(names)} to choose"
        else:  # the same sub/name.suffix in several folders: no name tells them apart
            how_to_choose = "the first folder's file wins; rename one to choose"
        labels = _labels(ordered)
        note = f"{text!r} matches {', '.join(labels)}; used {labels[0]} ({how_to_choose})"
    return Resolution(ordered[0], how, note)


def distinct_names(entries: Sequence[NetworkEntry]) -> dict[str, NetworkEntry]:
    """Each file under the shortest name that tells it apart from the others given: its stem
    (``anime``), else its path (``styles/anime``), else its path with the suffix (``anime.pt``
    beside ``anime.safetensors``). Every one of these names resolves to its file."""
    stems = Counter(e.name for e in entries)
    paths = Counter(e.relpath for e in entries)
    names: dict[str, NetworkEntry] = {}
    for entry in entries:
        if stems[entry.name] == 1:
            name = entry.name
        elif paths[entry.relpath] == 1:
            name = entry.relpath
        else:
            name = entry.relpath + entry.suffix
        names.setdefault(name, entry)
    return names


def _listing(entries: Sequence[NetworkEntry]) -> str:
    return ", ".join(_labels(entries))


def _labels(entries: Sequence[NetworkEntry]) -> list[str]:
    """Files as users see them (sub/name.suffix), or their full paths when folders share one."""
    labels = [f"{e.relpath}{e.suffix}" for e in entries]
    return labels if len(set(labels)) == len(labels) else [e.path for e in entries]


def _clean_metadata_value(key: str, value: object, entry: NetworkEntry) -> object:
    if key == "preferred weight":
        try:
            number = float(value or 0)
        except (TypeError, ValueError):
            raise InvalidConfigError(f"{entry.relpath}: preferred weight must be a number, found {value!r}") from None
        return number
    if key == "alias":
        alias = str(value or "").strip()
        if _ALIAS_FORBIDDEN.search(alias):
            raise InvalidConfigError(f"{entry.relpath}: alias {alias!r} may not contain : < > , / or \\")
        return alias
    if value is None:
        return ""
    if isinstance(value, (str, int, float, bool, list, dict)):
        return value
    raise InvalidConfigError(f"{entry.relpath}: {key} has an unsupported value {value!r}")
