"""The library: listing, name resolution, path-escape refusal, hashes, user metadata, LRU and plans."""

import json
import os

import pytest
import torch

import hypernetwork_ext as hx
from hypernetwork_ext.errors import InvalidConfigError, PathEscapeError, UnknownNetworkError
from hypernetwork_ext.library import MAX_TAGS, Library, distinct_names, fit_problem
from tests.support.bounds import bounded  # noqa: F401 (fixture)


def small(widths=(48, 32), seed=0, name="n"):
    return hx.create(widths, (1, 2, 1), "relu", "XavierNormal", seed=seed, name=name)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "hypernetworks"
    (root / "styles" / "deep").mkdir(parents=True)
    hx.save(small(seed=1), root / "anime.pt")
    hx.save(small(seed=2), root / "styles" / "Watercolor.safetensors")
    hx.save(small(seed=3), root / "styles" / "deep" / "anime.safetensors")
    hx.save(small(seed=4), root / "Ink.pt")
    hx.save(small(seed=5), root / "ink.safetensors")
    (root / "notes.txt").write_text("not a network")
    (root / "anime.pt.optim").write_bytes(b"optimizer state")
    return root


@pytest.fixture
def library(folder, tmp_path):
    return Library([str(folder)], cache_file=str(tmp_path / "cache" / "hashes.json"))


def test_lists_both_formats_recursively(library, folder):
    entries = library.entries
    assert sorted(e.relpath + e.suffix for e in entries) == [
        "Ink.pt",
        "anime.pt",
        "ink.safetensors",
        "styles/Watercolor.safetensors",
        "styles/deep/anime.safetensors",
    ]
    watercolor = next(e for e in entries if e.name == "Watercolor")
    assert watercolor.root == str(folder) and watercolor.file_format == "safetensors"
    assert watercolor.metadata_path == str(folder / "styles" / "Watercolor.json")


def test_extra_folders_and_missing_ones(folder, tmp_path):
    extra = tmp_path / "extra"
    extra.mkdir()
    hx.save(small(seed=9), extra / "more.pt")
    library = Library([str(folder), str(extra), str(tmp_path / "missing"), str(folder)])
    assert library.folders() == [str(folder), str(extra)]
    assert library.resolve("more").entry.root == str(extra)


def test_exact_stem_then_case_insensitive(library):
    assert library.resolve("Ink").entry.relpath == "Ink"
    assert library.resolve("ink").entry.relpath == "ink"
    assert library.resolve("WATERCOLOR").how == "case-insensitive name"
    with pytest.raises(UnknownNetworkError, match="only by letter case"):
        library.resolve("INK")


def test_shared_stem_picks_the_shallowest_with_a_note(library):
    resolution = library.resolve("anime")
    assert resolution.entry.relpath == "anime"
    assert "styles/deep/anime.safetensors" in resolution.note


def test_subfolder_paths(library):
    assert library.resolve("styles/deep/anime").how == "path"
    assert library.resolve("styles/deep/anime").entry.suffix == ".safetensors"
    assert library.resolve("styles\\Watercolor").entry.name == "Watercolor"
    assert library.resolve("styles/Watercolor.safetensors").entry.name == "Watercolor"


def test_a_name_with_its_suffix_resolves(library):
    assert library.resolve("anime.pt").entry.relpath + library.resolve("anime.pt").entry.suffix == "anime.pt"
    assert library.resolve("ink.safetensors").entry.suffix == ".safetensors"
    assert library.resolve("Ink.pt").entry.relpath == "Ink"


def test_one_name_in_two_formats_gets_a_note_that_can_be_followed(tmp_path):
    root = tmp_path / "networks"
    hx.save(small(seed=1, name="demo-trained"), root / "demo-trained.safetensors")
    hx.save(small(seed=1, name="demo-trained"), root / "demo-trained.pt")
    library = Library([str(root)])
    note = library.resolve("demo-trained").note
    assert "write demo-trained.pt or demo-trained.safetensors to choose" in note
    for offered in ("demo-trained.pt", "demo-trained.safetensors"):  # each offered name picks its file
        entry = library.resolve(offered).entry
        assert entry.name + entry.suffix == offered and library.resolve(offered).note is None


def test_one_name_in_two_folders_gets_a_note_that_says_which_wins(tmp_path):
    first, second = tmp_path / "models", tmp_path / "demo"
    hx.save(small(seed=1), first / "ink.safetensors")
    hx.save(small(seed=2), second / "ink.safetensors")
    resolution = Library([str(first), str(second)]).resolve("ink.safetensors")
    assert resolution.entry.root == str(first)
    assert resolution.note == (
        f"'ink.safetensors' matches {first / 'ink.safetensors'}, {second / 'ink.safetensors'}; "
        f"used {first / 'ink.safetensors'} (the first folder's file wins; rename one to choose)"
    )


def test_distinct_names_tell_every_file_apart(library, folder):
    names = distinct_names(library.entries)
    assert sorted(names) == ["Ink", "Watercolor", "anime", "ink", "styles/deep/anime"]
    hx.save(small(seed=6), folder / "anime.safetensors")  # the same path in two formats
    names = distinct_names(library.refresh())
    assert sorted(names) == ["Ink", "Watercolor", "anime.pt", "anime.safetensors", "ink", "styles/deep/anime"]
    for name, entry in names.items():  # every label resolves to its own file
        assert library.resolve(name).entry == entry


def test_unknown_names_name_the_folders_searched_missing_ones_too(folder, tmp_path):
    missing = tmp_path / "models" / "hypernetworks"
    library = Library([str(missing), str(folder)])
    with pytest.raises(UnknownNetworkError) as caught:
        library.resolve("nosuch")
    assert f"in {folder} ({missing} does not exist)" in str(caught.value)
    with pytest.raises(UnknownNetworkError) as caught:
        Library([str(missing)]).resolve("demo")
    assert str(caught.value) == f"no hypernetwork named 'demo' (searched nothing: {missing} does not exist)"


@pytest.mark.parametrize(
    "name", ["../secret", "styles/../../secret", "..\\secret", "/etc/passwd", "C:/x/y", "\\\\server\\x"]
)
def test_escapes_are_refused(library, name):
    with pytest.raises(PathEscapeError) as caught:
        library.resolve(name)
    assert repr(name) in str(caught.value)


def test_symlinks_leading_out_are_neither_listed_nor_resolved(library, folder, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    hx.save(small(seed=7), outside / "secret.pt")
    os.symlink(outside / "secret.pt", folder / "linked.pt")
    os.symlink(outside, folder / "linkdir")
    (folder / "store").mkdir()
    hx.save(small(seed=8), folder / "store" / "blob.pt")
    os.replace(folder / "store" / "blob.pt", folder / "store" / "blob.bin")
    os.symlink(folder / "store" / "blob.bin", folder / "styles" / "inside.pt")
    names = {e.relpath for e in library.refresh()}
    assert "linked" not in names and not any(n.startswith("linkdir") for n in names)
    assert "styles/inside" in names  # a link inside the folder is fine
    with pytest.raises(PathEscapeError, match="leads outside"):
        library.resolve("linkdir/secret")
    with pytest.raises(UnknownNetworkError):
        library.resolve("linked")


def test_unknown_names_suggest_close_ones(library, folder):
    with pytest.raises(UnknownNetworkError) as caught:
        library.resolve("animee")
    assert "no hypernetwork named 'animee'" in str(caught.value)
    assert str(folder) in str(caught.value)
    assert "did you mean anime" in str(caught.value)
    with pytest.raises(UnknownNetworkError):
        library.resolve("   ")


def test_alias_from_user_metadata(library):
    entry = library.resolve("Watercolor").entry
    library.write_user_metadata(entry, {"alias": "wc", "description": "soft"})
    assert library.resolve("wc").how == "alias"
    assert library.resolve("WC").entry == entry
    other = library.resolve("Ink").entry
    with pytest.raises(InvalidConfigError, match="already the name or alias"):
        library.write_user_metadata(other, {"alias": "wc"})
    with pytest.raises(InvalidConfigError, match="may not contain"):
        library.write_user_metadata(other, {"alias": "a:b"})
    with pytest.raises(InvalidConfigError, match="preferred weight must be a number"):
        library.write_user_metadata(other, {"preferred weight": "lots"})


def test_user_metadata_is_merged_and_written_atomically(library):
    entry = library.resolve("anime").entry
    with open(entry.metadata_path, "w", encoding="utf-8") as handle:
        json.dump({"description": "old", "sd version": "SD1"}, handle)
    data = library.write_user_metadata(entry, {"notes": "n", "preferred weight": "0.7", "activation text": "trigger"})
    assert data == {
        "description": "old",
        "sd version": "SD1",
        "notes": "n",
        "preferred weight": 0.7,
        "activation text": "trigger",
    }
    assert library.user_metadata(entry) == data
    assert library.preferred_multiplier(entry) == 0.7
    assert not [n for n in os.listdir(os.path.dirname(entry.path)) if n.endswith(".partial")]
    with open(entry.metadata_path, "w") as handle:
        handle.write("{broken")
    assert library.user_metadata(entry) == {}


def test_hash_lookup_and_persistent_cache(library, folder, tmp_path):
    entry = library.resolve("Watercolor").entry
    sha = hx.file_sha256(entry.path)
    assert library.cached_sha256(entry) is None
    assert library.resolve(sha[:10]).entry == entry
    assert library.resolve(sha[:10]).how == "hash"
    assert library.cached_sha256(entry) == sha
    reopened = Library([str(folder)], cache_file=str(tmp_path / "cache" / "hashes.json"))
    assert reopened.cached_sha256(reopened.resolve("Watercolor").entry) == sha
    # a changed file (new mtime/size) is hashed again, never served from the cache
    hx.save(small(seed=99, widths=(48,)), entry.path, overwrite=True)
    os.utime(entry.path, (1, 1))
    changed = reopened.refresh()
    changed_entry = next(e for e in changed if e.name == "Watercolor")
    assert reopened.cached_sha256(changed_entry) is None
    assert reopened.sha256(changed_entry) == hx.file_sha256(entry.path) != sha


def test_damaged_cache_file_is_ignored(folder, tmp_path):
    cache = tmp_path / "c.json"
    cache.write_text("{not json")
    library = Library([str(folder)], cache_file=str(cache))
    entry = library.resolve("anime").entry
    assert library.sha256(entry) == hx.file_sha256(entry.path)
    assert json.loads(cache.read_text())["version"] == 2


def test_lru_keeps_pinned_and_a_limited_number_of_others(library):
    loads = []
    library._loader = lambda path: loads.append(path) or hx.load(path)
    library.set_cache_size(1)
    a, b, c = (library.resolve(n).entry for n in ("Ink", "ink", "Watercolor"))
    library.pin([a])
    for entry in (a, b, c, a, c):
        library.load(entry)
    assert [os.path.basename(p) for p in loads] == ["Ink.pt", "ink.safetensors", "Watercolor.safetensors"]
    assert set(library.loaded_keys()) == {a.key, c.key}
    library.set_cache_size(0)
    assert library.loaded_keys() == [a.key]
    library.pin([])
    assert library.loaded_keys() == []


def test_info_describes_the_file_and_reports_broken_ones(library, folder):
    info = library.info(library.resolve("anime").entry)
    assert info["widths"] == [48, 32] and info["activation"] == "relu" and info["format"] == "pt"
    (folder / "broken.pt").write_bytes(b"garbage")
    library.refresh()
    broken = library.info(library.resolve("broken").entry)
    assert "broken.pt" in broken["error"]
    described = library.describe(library.resolve("Ink").entry)
    assert described["short_hash"] == described["sha256"][:10] and described["relative_path"] == "Ink"


def nan_network(folder, name="nan.pt", bad=5):
    network = small(seed=6)
    with torch.no_grad():
        network.layers[48][0].linear[0].weight.view(-1)[:bad] = float("nan")
    return hx.save(network, folder / name)


def test_a_card_says_how_many_weights_are_not_finite(library, folder):
    path = nan_network(folder)
    library.refresh()
    info = library.info(library.resolve("nan").entry)
    assert path in info["error"] and "5 of 27,104 weights are NaN or infinite" in info["error"]
    assert info["non_finite_weights"] == 5 and info["parameters"] == 27_104


def test_summaries_cached_before_the_nan_check_are_made_again_and_hashes_kept(folder, tmp_path):
    """A version 1 cache could hold a normal summary for a file with NaN weights."""
    path = nan_network(folder)
    cache = tmp_path / "c.json"
    entry = Library([str(folder)]).resolve("nan").entry
    stale = {"size": entry.size, "mtime": entry.mtime, "sha256": "ab" * 32, "info": {"widths": [48, 32]}}
    cache.write_text(json.dumps({"version": 1, "files": {entry.path: stale}}))
    library = Library([str(folder)], cache_file=str(cache))
    assert library.cached_sha256(entry) == "ab" * 32
    assert path in library.info(entry)["error"]


def test_a_network_with_nan_weights_is_never_planned(library, folder):
    path = nan_network(folder)
    library.refresh()
    plan = library.plan([["nan", "0.8"], ["anime"]])
    assert [item.entry.relpath for item in plan.networks] == ["anime"]
    (problem,) = plan.problems
    assert problem.startswith("<hypernet:nan:0.8>: cannot load: ") and path in problem
    assert "5 of 27,104 weights are NaN or infinite" in problem


def test_a_plan_uses_at_most_64_tags_and_says_so(library):
    """5,000 unknown names took 5.5 s to plan with 30 files (and more with more); 5,000 copies of a
    known tag planned 5,000 networks, each then run at every sampling step."""
    plan = library.plan([["anime", "0.5"]] * 100 + [[f"nosuch{i}"] for i in range(10_000)])
    assert len(plan.networks) == MAX_TAGS == 64
    assert plan.problems == ["10,036 more <hypernet:...> tags were ignored: one generation uses at most 64"]


def test_a_fifo_in_place_of_notes_or_of_a_listed_file_is_refused_without_waiting(library, folder, bounded):  # noqa: F811
    os.mkfifo(folder / "anime.json")  # A1111's user metadata beside anime.pt
    entry = library.resolve("Ink").entry
    (folder / "Ink.pt").unlink()
    os.mkfifo(folder / "Ink.pt")  # replaced after the listing
    with bounded(10):
        assert library.user_metadata(library.resolve("anime").entry) == {}
        with pytest.raises(hx.FileFormatError, match="FIFO"):
            library.sha256(entry)
        plan = library.plan([["Ink"]])
    assert "Ink.pt" in plan.problems[0] and "FIFO" in plan.problems[0]


def test_plan_keeps_going_after_bad_tags(library, folder):
    (folder / "broken.pt").write_bytes(b"garbage")
    library.refresh()
    tags = [["anime", "0.5"], ["nosuch"], ["Ink", "x"], ["broken"], ["../up"], ["styles/Watercolor", "k=2"]]
    plan = library.plan(tags)
    assert [item.entry.relpath for item in plan.networks] == ["anime", "styles/Watercolor"]
    assert plan.networks[1].strength.key == 2.0
    assert len(plan.problems) == 4
    assert plan.problems[0].startswith("<hypernet:nosuch>: no hypernetwork named 'nosuch'")
    assert "multiplier must be a number" in plan.problems[1]
    assert plan.problems[2].startswith("<hypernet:broken>: cannot load:")
    assert "climbs out" in plan.problems[3]
    assert any("matches" in note for note in plan.notes)  # "anime" is shared by two files
    assert plan.hashes == {
        name: library.short_hash(item.entry)
        for name, item in zip(["anime", "styles/Watercolor"], plan.networks, strict=True)
    }
    assert set(library.loaded_keys()) >= {item.entry.key for item in plan.networks}


def test_a_malformed_tag_also_says_when_its_name_does_not_exist(library):
    """``<hypernet:x:abc>`` has two problems; fixing the multiplier should not merely reveal the second."""
    plan = library.plan([["x", "abc"], ["anime", "abc"], ["y", "1", "foo=2"]])
    unknown, known, named = plan.problems
    assert unknown.startswith("<hypernet:x:abc>: multiplier must be a number, found 'abc'")
    assert "no hypernetwork named 'x'" in unknown and str(library.folders()[0]) in unknown
    assert "multiplier must be a number" in known and "no hypernetwork" not in known  # anime exists
    assert "unknown argument 'foo'" in named and "no hypernetwork named 'y'" in named
    assert plan.names_not_found  # a refreshed listing may find them


def test_family_mismatch_is_skipped_unless_forced(tmp_path):
    root = tmp_path / "h"
    root.mkdir()
    hx.save(hx.create((768, 320, 640, 1280), seed=0), root / "sd1.pt")
    hx.save(hx.create((2048, 640, 1280), seed=0), root / "xl.safetensors")
    library = Library([str(root)])
    plan = library.plan([["sd1"], ["xl"]], context_width=2048, self_widths=(640, 1280))
    assert [item.entry.name for item in plan.networks] == ["xl"]
    assert "is made for SD1" in plan.problems[0] and "does not fit SDXL" in plan.problems[0]
    forced = library.plan([["sd1"]], context_width=2048, self_widths=(640, 1280), force_mismatch=True)
    assert [item.entry.name for item in forced.networks] == ["sd1"] and "applied although" in forced.notes[0]
    assert fit_problem(hx.load(root / "sd1.pt"), 768, (320, 640, 1280)) is None
    assert fit_problem(hx.load(root / "sd1.pt"), None, ()) is None


def test_a_lookup_over_every_file_writes_the_cache_once(library, tmp_path, monkeypatch):
    import hypernetwork_ext.library as library_module

    writes = []
    real_write = library_module.atomic_write_bytes
    monkeypatch.setattr(
        library_module, "atomic_write_bytes", lambda *a, **k: (writes.append(a[0]), real_write(*a, **k))
    )
    assert len(library.entries) > 2
    assert library.find_by_hash("f" * 64) == []  # hashes every file
    assert len(writes) == 1
    reopened = Library(library.folders(), cache_file=str(tmp_path / "cache" / "hashes.json"))
    assert all(reopened.cached_sha256(entry) for entry in reopened.entries)


def test_a_hash_lookup_passes_over_files_removed_since_the_folders_were_listed(library):
    """In the real Forge Classic a pasted infotext's hash was looked up after the suite had deleted a
    trained network the library still listed: "no such file", and the paste failed with a traceback."""
    entries = library.entries
    wanted = library.sha256(entries[0])
    gone = next(entry for entry in entries[1:] if library.cached_sha256(entry) is None)
    os.remove(gone.path)
    assert gone in library.entries  # still listed until the folders are read again (a refresh)
    assert library.find_by_hash(wanted[:10]) == [entries[0]]
    assert library.find_by_hash("f" * 10) == []
