"""A test harness that talks to a MONAI Label server the way 3D Slicer's MONAI Label plugin does.

Written from reading the plugin (Project-MONAI/MONAILabel, ``plugins/slicer/MONAILabel/MONAILabel.py`` and
``MONAILabelLib/client.py``), not copied from it. What it reproduces, because that is where a server can break the
plugin:

- ``getParamsFromConfig``: every ``config`` entry of ``/info/`` is sent back as is, list entries as their first item
  (``v[0]``: an empty list raises ``IndexError`` in Slicer before any request);
- the options table: list/dict entries become combo boxes filled with ``addItem(v)`` (strings) and, on edit, the chosen
  text is moved to the front with ``list.remove(text)`` (so list items must be strings); ints/floats/bools/strings are
  edited as text or check boxes; ``None`` shows as an empty cell and comes back as ``""``;
- requests: ``client_id`` added to every parameter dict; ``POST /activelearning/<strategy>`` with a JSON body;
  ``POST /infer/<model>?image=<id>`` as multipart with a ``params`` JSON field and a multipart answer (``params`` +
  the label file); DeepGrow clicks as ``foreground``/``background`` lists of IJK points plus ``label`` (the segment
  name); ``PUT /datastore/label?image=<id>&tag=final`` with ``{"label_info": [{"name", "idx"}], "model"}``;
  ``POST /train/<model>`` with the train config as JSON body; ``GET /train/?check_if_running=true`` (200 = running);
  ``GET /info/`` ``train_stats`` read as the plugin's progress and accuracy bars do;
- the result: the label file is read with SimpleITK (as ``updateSegmentationMask`` does) and values are mapped to
  segment names from ``label_names`` of the answer (else the model's ``labels``), sorted by value.
"""

from __future__ import annotations

import http.client
import json
import mimetypes
import os
import tempfile
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any
from urllib.parse import quote_plus, urlparse

__all__ = ["SlicerClient", "SlicerClientError", "params_from_config", "check_options_table", "segments_of"]

SECTIONS = {"infer": "models", "train": "trainers", "activelearning": "strategies", "scoring": "scoring"}


class SlicerClientError(Exception):
    """A non-200 answer (``status``, ``body``), as the plugin's ``MONAILabelClientException``."""

    def __init__(self, status: int, body: bytes | str) -> None:
        self.status = status
        self.body = body.decode(errors="replace") if isinstance(body, bytes) else body
        super().__init__(f"Status: {status}; Response: {self.body[:2000]}")


def params_from_config(info: dict[str, Any], section: str, name: str) -> dict[str, Any]:
    """The plugin's ``getParamsFromConfig``: ``v[0]`` of list entries (``IndexError`` on an empty list, as Slicer)."""
    config = info.get(SECTIONS.get(section, section), {}).get(name, {}).get("config", {})
    return {k: v[0] if isinstance(v, list) else v for k, v in config.items()}


def check_options_table(info: dict[str, Any]) -> list[str]:
    """Problems the plugin's options table would hit for any config entry of ``/info/`` (empty when none)."""
    problems = []
    for section in SECTIONS.values():
        for name, entry in (info.get(section) or {}).items():
            for key, value in (entry.get("config") or {}).items():
                where = f"{section}/{name}/{key}"
                if isinstance(value, (list, dict)):
                    items = list(value)
                    if not items:
                        problems.append(f"{where}: empty {type(value).__name__} (v[0] raises IndexError)")
                    elif not all(isinstance(v, str) for v in items):
                        problems.append(f"{where}: combo box items must be strings, got {items}")
                    elif isinstance(value, list):
                        edited = list(value)  # invalidateConfigTable: the chosen text goes to the front
                        edited.remove(edited[-1])
                elif value is None:
                    problems.append(f"{where}: None shows as an empty cell and comes back as ''")
    return problems


def segments_of(label_file: str, label_names: dict[str, int] | list[str]) -> tuple[Any, dict[str, int]]:
    """Read a returned label map as ``updateSegmentationMask`` does (SimpleITK) and name its values.

    Returns:
        ``(array, {segment name: value})``; the array's dtype is the file's pixel type.
    """
    import SimpleITK as sitk

    image = sitk.ReadImage(label_file)
    array = sitk.GetArrayFromImage(image)  # (z, y, x): the plugin hands it to Slicer as is
    if isinstance(label_names, dict):
        names = [k for k, _ in sorted(label_names.items(), key=lambda kv: kv[1])]
        values = {k: label_names[k] for k in names if k != "background"}
    else:
        values = {k: i + 1 for i, k in enumerate(n for n in label_names if n != "background")}
    return array, values


class SlicerClient:
    """The plugin's HTTP calls (``http.client``, as its ``MONAILabelUtils``), one method per plugin action."""

    def __init__(self, server_url: str, client_id: str = "user-xyz", tmpdir: str | None = None) -> None:
        self.url = server_url.rstrip("/")
        self.client_id = client_id
        self.tmpdir = tmpdir or tempfile.mkdtemp(prefix="slicer_")

    # -- transport ----------------------------------------------------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        parsed = urlparse(self.url)
        return http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=600)

    def _with_client_id(self, params: dict[str, Any] | None) -> dict[str, Any]:
        params = dict(params or {})
        params["client_id"] = self.client_id
        return params

    def _request(self, method: str, selector: str, body: Any = None) -> tuple[int, bytes, Any]:
        headers = {}
        if body:
            body = json.dumps(body)
            headers.update({"content-type": "application/json", "content-length": str(len(body))})
        conn = self._conn()
        conn.request(method, selector, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read(), response.headers

    def _multipart(self, method: str, selector: str, fields: dict[str, str], files: dict[str, str]):
        boundary = "----------guidino_slicer_harness_$"
        body = bytearray()
        for key, value in fields.items():
            body += f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
        for key, filename in files.items():
            ctype = mimetypes.guess_type(filename)[0] or "application/octet-stream"
            body += (f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"; filename="{filename}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n").encode()  # fmt: skip
            with open(filename, "rb") as f:
                body += f.read() + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        headers = {"content-type": f"multipart/form-data; boundary={boundary}", "content-length": str(len(body))}
        conn = self._conn()
        conn.request(method, selector, body=bytes(body), headers=headers)
        response = conn.getresponse()
        return response.status, response.read(), response.headers

    @staticmethod
    def _check(status: int, body: bytes) -> None:
        if status != 200:
            raise SlicerClientError(status, body)

    # -- plugin actions -----------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        status, body, _ = self._request("GET", "/info/")
        self._check(status, body)
        return json.loads(body)

    def datastore(self) -> dict[str, Any]:
        status, body, _ = self._request("GET", "/datastore/?output=all")
        self._check(status, body)
        return json.loads(body)

    def next_sample(self, strategy: str, params: dict[str, Any]) -> dict[str, Any]:
        status, body, _ = self._request("POST", f"/activelearning/{quote_plus(strategy)}", self._with_client_id(params))
        self._check(status, body)
        return json.loads(body)

    def infer(self, model: str, image_id: str, params: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """``(label file or None, result params)`` from the multipart answer."""
        selector = f"/infer/{quote_plus(model)}?image={quote_plus(image_id)}"
        fields = {"params": json.dumps(self._with_client_id(params))}
        status, body, headers = self._multipart("POST", selector, fields, {})
        self._check(status, body)
        ctype = headers.get("content-type", "")
        if "multipart" not in ctype:
            return None, json.loads(body)
        message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {ctype}\r\n\r\n".encode() + body)
        form, out_file = {}, None
        for part in message.iter_parts():
            payload = part.get_payload(decode=True)
            filename = part.get_filename()
            if filename:
                out_file = os.path.join(self.tmpdir, os.path.basename(filename))
                with open(out_file, "wb") as f:
                    f.write(payload)
            else:
                form[part.get_param("name", header="content-disposition")] = payload.decode()
        params = form.get("params")
        return out_file, json.loads(params) if isinstance(params, str) else (params or {})

    def save_label(self, image_id: str, label_file: str, params: dict[str, Any], tag: str = "final") -> dict:
        selector = f"/datastore/label?image={quote_plus(image_id)}&tag={quote_plus(tag)}"
        fields = {"params": json.dumps(self._with_client_id(params))}
        status, body, _ = self._multipart("PUT", selector, fields, {"label": label_file})
        self._check(status, body)
        return json.loads(body)

    def train_start(self, model: str, params: dict[str, Any]) -> dict[str, Any]:
        status, body, _ = self._request("POST", f"/train/{quote_plus(model)}", self._with_client_id(params))
        self._check(status, body)
        return json.loads(body)

    def train_status(self, check_if_running: bool = False) -> Any:
        status, body, _ = self._request("GET", "/train/?check_if_running=true" if check_if_running else "/train/")
        if check_if_running:
            return status == 200
        self._check(status, body)
        return json.loads(body)

    def scoring(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        status, body, _ = self._request("POST", f"/scoring/{quote_plus(method)}", self._with_client_id(params))
        self._check(status, body)
        return json.loads(body)

    def scoring_status(self, check_if_running: bool = False) -> Any:
        status, body, _ = self._request("GET", "/scoring/?check_if_running=true" if check_if_running else "/scoring/")
        if check_if_running:
            return status == 200
        self._check(status, body)
        return json.loads(body)

    @staticmethod
    def progress(info: dict[str, Any]) -> tuple[float, float]:
        """``(progress percent, accuracy)`` as ``monitorTraining`` computes them from ``/info/`` ``train_stats``."""
        train_stats = info.get("train_stats")
        stats = next(iter(train_stats.values())) if train_stats else {}
        current = 0 if stats.get("total_time") else stats.get("epoch", 1)
        total = stats.get("total_epochs", 1)
        percent = max(1, 100 * current / total)
        return percent, float(stats.get("best_metric", 0))
