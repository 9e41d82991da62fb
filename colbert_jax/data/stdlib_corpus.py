"""A real-text corpus every Python has: the standard library's docstrings, one passage per documented
public function, class or method: its qualified name as title, its whole docstring (whitespace
collapsed, at most 200 words) as text.

The corpus is deterministic for a given Python version (documentation differs slightly between
versions). Modules that open windows or print on import are not in the list.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import warnings

__all__ = ["stdlib_passages", "MODULES"]

MODULES = (
    "abc argparse array ast asyncio base64 bisect builtins bz2 calendar cmath codecs collections colorsys "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib dis email.message "
    "enum filecmp fnmatch fractions ftplib functools gc getopt gettext glob graphlib gzip hashlib heapq hmac "
    "html html.parser http.client http.cookies http.server imaplib importlib inspect io ipaddress itertools "
    "json keyword linecache locale logging lzma mailbox math mimetypes mmap multiprocessing netrc numbers "
    "operator os os.path pathlib pickle pkgutil platform plistlib poplib pprint queue quopri random re reprlib "
    "sched secrets select selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat "
    "statistics string struct subprocess symtable sys sysconfig tarfile tempfile textwrap threading time "
    "timeit tokenize trace traceback types typing unicodedata urllib.parse urllib.request uuid warnings wave "
    "weakref xml.dom.minidom xml.etree.ElementTree zipfile zlib zoneinfo"
).split()

_MAX_WORDS = 200


def _clean(doc: str) -> str:
    return " ".join(doc.split()[:_MAX_WORDS])


def _from_stdlib(obj) -> bool:
    """False for things other packages attached to stdlib classes (e.g. transformers patches logging)."""
    module = getattr(obj, "__module__", None)
    return not module or module.split(".")[0].lstrip("_") in sys.stdlib_module_names or module == "builtins"


def _documented(prefix: str, obj, depth: int):
    if not _from_stdlib(obj):
        return
    doc = inspect.getdoc(obj)
    if doc and len(doc.split()) >= 3:
        yield prefix, _clean(doc)
    if depth == 0 or not inspect.isclass(obj):
        return
    for name, member in sorted(vars(obj).items()):
        if name.startswith("_") or not (inspect.isroutine(member) or isinstance(member, property)):
            continue
        yield from _documented(f"{prefix}.{name}", member, depth - 1)


def stdlib_passages() -> list[tuple[str, str]]:
    """Returns `[(title, passage text)]`, titles unique, in a fixed order."""
    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for module_name in MODULES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(module_name)
        except ImportError:
            continue
        public = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
        for name in sorted(set(public)):
            obj = getattr(module, name, None)
            if obj is None or not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            owner = getattr(obj, "__module__", module_name) or module_name
            if module_name != "builtins" and owner.split(".")[0] not in (
                module_name.split(".")[0],
                "_" + module_name,
                "posix",
                "_io",
                "_collections",
                "_operator",
            ):
                continue  # re-exported from another module: documented there
            for title, text in _documented(f"{module_name}.{name}", obj, depth=1):
                if title not in seen and text:
                    seen.add(title)
                    out.append((title, text))
    return out
