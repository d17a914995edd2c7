"""Every error code chatd can send a client is in chatd.room.ERROR_CODES, and README.md
explains each: derived from chatd's source, so a new code cannot go unlisted."""

import ast
import pathlib
import re

from chatd.room import ERROR_CODES

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: The calls that make a client-facing error, and which argument is its code.
CODE_ARGUMENT = {"Failed": 0, "Invalid": 0, "refusal": 1, "refuse": 2}
#: The calls that make an error of one code always (``ERR busy <seconds>``, ``ERR moved <sent>``).
FIXED_CODE = {"Busy": "busy", "Moved": "moved"}


def codes_made(path: pathlib.Path) -> set[str]:
    """The codes ``path`` makes; fails on a code that is neither a literal nor passed on
    (a variable ``code``, or ``<something>.code``), which this test could not see."""
    made = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
        if name in FIXED_CODE:
            made.add(FIXED_CODE[name])
        if name not in CODE_ARGUMENT:
            continue
        arguments = {keyword.arg: keyword.value for keyword in node.keywords}
        index = CODE_ARGUMENT[name]
        code = node.args[index] if len(node.args) > index else arguments.get("code")
        where = f"{path.relative_to(ROOT)}:{node.lineno}"
        if isinstance(code, ast.Constant) and isinstance(code.value, str):
            made.add(code.value)
        else:
            passed_on = (isinstance(code, ast.Name) and code.id == "code") or \
                        (isinstance(code, ast.Attribute) and code.attr == "code")
            assert passed_on, f"{where}: {name}(…) with a code this test cannot read: {ast.unparse(node)}"
    return made


def chatd_codes() -> dict[pathlib.Path, set[str]]:
    return {path: codes_made(path) for path in sorted((ROOT / "chatd").rglob("*.py"))}


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def test_chatd_sends_exactly_the_listed_codes():
    made = set().union(*chatd_codes().values())
    assert made - set(ERROR_CODES) == set(), "sent but not in chatd.room.ERROR_CODES"
    assert set(ERROR_CODES) - made == set(), "listed but never sent"
    assert len(ERROR_CODES) == len(set(ERROR_CODES))


def test_the_scan_sees_what_it_must():
    """The scan finds the codes of the room, the line codec, the server's own and its refusals."""
    by_file = {path.relative_to(ROOT).as_posix(): codes for path, codes in chatd_codes().items()}
    assert {"bad-name", "self-pair", "empty-message", "not-paired"} <= by_file["chatd/room.py"]
    assert {"line-too-long", "bad-encoding"} <= by_file["chatd/protocols/line.py"]
    assert {"crashed-server", "internal-error", "server-full", "too-many-connections"} <= by_file["chatd/server.py"]


def test_the_readme_error_table_lists_every_code_once():
    rows = re.findall(r"^\| `ERR ([a-z-]+)` \|", readme_section("The line protocol"), re.M)
    assert sorted(rows) == sorted(ERROR_CODES)


def test_the_readme_web_chat_names_every_code_the_web_chat_can_get():
    by_file = chatd_codes()
    line_only = by_file[ROOT / "chatd/protocols/line.py"] - set().union(
        *(codes for path, codes in by_file.items() if path.name != "line.py"))
    assert line_only == {"line-too-long", "bad-encoding"}, "the WebSocket closes for these instead (1009, 1007)"
    web = readme_section("The web chat")
    missing = [code for code in ERROR_CODES if code not in line_only and f"`{code}`" not in web]
    assert missing == []
