"""Stores read through URLs, read-only, by byte ranges (zarr's fsspec store; nothing downloaded whole).

The server is a small one of the test's own that answers range requests, as real web servers and object stores
do (Python's http.server does not).
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import re
import shutil
import threading

import numpy as np
import pytest
import xarray as xr


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=a-b`` (and suffix ``bytes=-n``) answered as 206 Partial Content."""

    requests_with_range = 0

    def log_message(self, *args):
        pass

    def send_head(self):
        path = self.translate_path(self.path)
        ranged = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if os.path.isdir(path) or not ranged or not os.path.isfile(path):
            return super().send_head()
        type(self).requests_with_range += 1
        with open(path, "rb") as f:
            data = f.read()
        first, last = ranged.groups()
        start, end = (len(data) - int(last), len(data) - 1) if first == "" else \
            (int(first), min(int(last) if last else len(data) - 1, len(data) - 1))
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        return io.BytesIO(data[start:end + 1])


@pytest.fixture(scope="module")
def served(tmp_path_factory, many_prompts):
    """(URL of a copy of the tiny store served over HTTP, the local copy)."""
    root = tmp_path_factory.mktemp("served")
    local = root / "acts.zarr"
    shutil.copytree(many_prompts.store_1rank, local)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/acts.zarr", local
    server.shutdown()


def test_info_and_deep_validation_over_http(served, run_repgeo):
    url, _ = served
    code, out, err = run_repgeo("info", url)
    assert code == 0 and "remote (not measured)" in out and "120/120 prompts done" in out, err
    code, out, err = run_repgeo("validate", "--deep", url)
    assert (code, out.strip()) == (0, f"{url}: valid"), out + err


@pytest.mark.slow  # a Dask cluster reading over HTTP (15 s): in the full suite, to keep the quick subset under 10 minutes
def test_summarize_over_http_equals_the_local_copy(served, tmp_path, run_repgeo):
    url, local = served
    results = {}
    for name, store in (("remote", url), ("local", local)):
        out = tmp_path / f"{name}.zarr"
        code, _, err = run_repgeo("summarize", "--store", store, "--out", out, "--workers", 2, "--observables",
                                  "gride,overlap,norm")
        assert code == 0, err
        results[name] = xr.open_zarr(out)
    for variable in ("gride_id", "overlap", "norm_mean", "done"):
        np.testing.assert_array_equal(results["remote"][variable].values, results["local"][variable].values)
    assert results["remote"].attrs["source"]["path"] == url


def test_the_python_api_opens_a_url(served):
    import toolkit

    url, local = served
    remote = toolkit.open_activations(url)
    np.testing.assert_array_equal(remote.hidden[3, 2].values, toolkit.open_activations(str(local)).hidden[3, 2].values)
    assert RangeHandler.requests_with_range > 0  # shards are read by byte ranges


@pytest.mark.parametrize("args", [
    ["summarize", "--store", "STORE", "--out", "http://127.0.0.1:9/new.zarr"],
    ["extract", "--model", "m", "--prompts", "p.jsonl", "--out", "http://127.0.0.1:9/new.zarr"],
    ["subset", "STORE", "--out", "s3://bucket/new.zarr"],
])
def test_a_store_is_never_written_through_a_url(args, served, run_repgeo, the_error_line):
    url, _ = served
    code, _, err = run_repgeo(*[url if a == "STORE" else a for a in args])
    assert code == 2 and "never written" in the_error_line(err)


def test_a_url_without_a_store_is_one_line(served, run_repgeo, the_error_line):
    url, _ = served
    code, _, err = run_repgeo("info", url.replace("acts.zarr", "nothing.zarr"))
    assert code == 2 and "no Zarr v3 group" in the_error_line(err)
