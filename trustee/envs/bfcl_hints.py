"""Environment Tuning's actionable augmentation for BFCL: the hint table.

Owns `HINTS` (rules written for trustee, after the paper's examples) and `augment`, which
turns an unhelpful tool error into a corrective observation: the original result plus a
"hint" saying what to do next (which tool finds the missing value, which format is
expected). Hints change only what the policy *sees*; the per-turn checks always compare
BFCL's raw results, so scores mean the same with hints on or off.

Each rule names a method, a test on the executed call (arguments, raw return value or
error text, the live world), and a function that writes the hint. Rules are tried in
order; the first that matches wins. Callers: `envs/bfcl.py` when hints are on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from trustee.envs.bfcl_exec import BfclWorld, ExecResult


@dataclass(frozen=True)
class HintRule:
    """`methods`: method names the rule applies to (empty = any); `when(result, world)`
    says whether it fires; `hint(result, world)` writes the corrective message."""

    name: str
    methods: frozenset[str]
    when: Callable[[ExecResult, BfclWorld], bool]
    hint: Callable[[ExecResult, BfclWorld], str]


def _err(r: ExecResult) -> str:
    """The error text of a failed call ('' when it did not fail)."""
    if not r.error:
        return ""
    if isinstance(r.value, dict):
        return str(r.value.get("error", ""))
    if isinstance(r.value, list) and r.value and isinstance(r.value[0], dict):
        return str(r.value[0].get("error", ""))
    return r.text


def _arg(r: ExecResult, key: str) -> Any:
    return r.call.arguments.get(key)


def _airports(world: BfclWorld) -> list[str]:
    return list(world.method("list_all_airports")()) if world.has("list_all_airports") else []


def _bad_airports(r: ExecResult, world: BfclWorld) -> list[str]:
    known = set(_airports(world))
    return [
        str(_arg(r, k))
        for k in ("travel_from", "travel_to")
        if _arg(r, k) is not None and _arg(r, k) not in known
    ]


def _airport_hint(r: ExecResult, world: BfclWorld) -> str:
    bad = _bad_airports(r, world)
    return (
        f"Invalid airport code(s): {', '.join(repr(b) for b in bad)}. Airports are given by their 3-letter codes; "
        "call 'list_all_airports' for every valid code or 'get_nearest_airport_by_city' to find the code of a city."
    )


def _route_hint(r: ExecResult, world: BfclWorld) -> str:
    return (
        f"There is no flight from {_arg(r, 'travel_from')!r} to {_arg(r, 'travel_to')!r}. Check the direction "
        "(travel_from is the departure) and that both codes are the airports the user meant "
        "('get_nearest_airport_by_city' maps a city to its airport)."
    )


def _currencies(world: BfclWorld) -> str:
    return "USD, RMB, EUR, JPY, GBP, CAD, AUD, INR, RUB, BRL, MXN"


def _file_missing_hint(r: ExecResult, world: BfclWorld) -> str:
    cwd = _cwd(world)
    return (
        f"The name is not in the current directory{f' ({cwd!r})' if cwd else ''}: file tools take a name in the "
        "current directory, not a path. Call 'ls' to see what is here, 'find' to locate the file, and 'cd' into "
        "its folder one level at a time."
    )


def _cwd(world: BfclWorld) -> str:
    fs = world.instances.get("GorillaFileSystem")
    d = getattr(fs, "_current_dir", None)
    return getattr(d, "name", "") if d is not None else ""


def _login_hint(tool: str) -> Callable[[ExecResult, BfclWorld], str]:
    return lambda r, w: (
        f"Log in first: call '{tool}' (the credentials are usually in the conversation), then retry."
    )


def _signature_hint(r: ExecResult, world: BfclWorld) -> str:
    import inspect

    params = list(inspect.signature(world.method(r.call.name)).parameters)
    return f"'{r.call.name}' takes exactly these parameters: {params}. Use those names and give every required one."


def _matches(pattern: str) -> Callable[[ExecResult, BfclWorld], bool]:
    rx = re.compile(pattern, re.IGNORECASE)
    return lambda r, w: bool(rx.search(_err(r)))


def _rule(name: str, methods: tuple[str, ...], when, hint) -> HintRule:
    return HintRule(name=name, methods=frozenset(methods), when=when, hint=hint)


HINTS: tuple[HintRule, ...] = (
    # Inter-tool dependencies: the value the call needs comes from another tool.
    _rule(
        "airport_code",
        ("get_flight_cost", "book_flight"),
        lambda r, w: r.error and bool(_bad_airports(r, w)),
        _airport_hint,
    ),
    _rule("no_route", ("get_flight_cost", "book_flight"), _matches("no available route"), _route_hint),
    _rule(
        "currency",
        ("compute_exchange_rate",),
        _matches("no available exchange rate"),
        lambda r, w: (
            f"No exchange rate for {_arg(r, 'base_currency')!r} to {_arg(r, 'target_currency')!r}. "
            f"Use 3-letter currency codes among: {_currencies(w)}."
        ),
    ),
    _rule(
        "zipcode",
        ("estimate_distance",),
        _matches("distance not found"),
        lambda r, w: (
            "'estimate_distance' takes zipcodes, not city names: call 'get_zipcode_based_on_city' for each city "
            "and pass the returned zipcodes."
        ),
    ),
    _rule(
        "stock_symbol",
        ("get_stock_info", "place_order", "add_to_watchlist"),
        _matches("not found|invalid stock symbol"),
        lambda r, w: (
            "Unknown stock symbol. Call 'get_symbol_by_name' with the company name, or 'get_available_stocks' "
            "with a sector, to get a valid symbol."
        ),
    ),
    _rule(
        "card",
        ("get_credit_card_balance", "book_flight", "purchase_insurance"),
        _matches("card not registered|credit card not registered"),
        lambda r, w: (
            "That card id is not registered: call 'get_all_credit_cards' to list the valid card ids."
        ),
    ),
    _rule(
        "travel_token",
        (),
        lambda r, w: (
            r.class_name == "TravelAPI"
            and bool(re.search("access token|token not initialized", _err(r), re.I))
        ),
        lambda r, w: "Call 'authenticate_travel' first and pass the 'access_token' it returns to this tool.",
    ),
    _rule(
        "booking_id",
        ("cancel_booking", "retrieve_invoice", "purchase_insurance", "contact_customer_support"),
        _matches("booking not found"),
        lambda r, w: "Unknown booking id: call 'get_booking_history' (with the access token) to find it.",
    ),
    # Intra-tool rules: how the tool wants its arguments.
    _rule(
        "cd_path",
        ("cd",),
        _matches("only one folder level|unsupported path"),
        lambda r, w: (
            "Paths are not allowed in 'cd': move one directory at a time, e.g. cd(folder='a') then cd(folder='b')."
        ),
    ),
    _rule(
        "cd_missing",
        ("cd",),
        _matches("no such"),
        lambda r, w: (
            f"No such folder in the current directory ({_cwd(w)!r}). Call 'ls' to see the folders here, "
            "'cd' with '..' to go up, or 'find' to locate it."
        ),
    ),
    _rule(
        "dest_path",
        ("mv", "cp"),
        _matches("path not allowed"),
        lambda r, w: (
            "The destination must be a name in the current directory, not a path: 'cd' there first if needed."
        ),
    ),
    _rule(
        "file_missing",
        ("cat", "grep", "tail", "wc", "sort", "diff", "rm", "rmdir", "mv", "cp", "echo"),
        _matches("no such file"),
        _file_missing_hint,
    ),
    _rule(
        "date_format",
        ("verify_traveler_information", "book_flight", "get_flight_cost"),
        lambda r, w: bool(re.search("date.*format|does not match format", _err(r) + r.text, re.I)),
        lambda r, w: "Write dates as YYYY-MM-DD, e.g. 1990-05-17.",
    ),
    _rule(
        "twitter_login",
        (),
        lambda r, w: r.class_name == "TwitterAPI" and "not authenticated" in _err(r).lower(),
        _login_hint("authenticate_twitter"),
    ),
    _rule(
        "ticket_login",
        (),
        lambda r, w: r.class_name == "TicketAPI" and "not authenticated" in _err(r).lower(),
        _login_hint("ticket_login"),
    ),
    _rule(
        "trading_login",
        (),
        lambda r, w: r.class_name == "TradingBot" and "not authenticated" in _err(r).lower(),
        _login_hint("trading_login"),
    ),
    _rule(
        "message_login",
        (),
        lambda r, w: r.class_name == "MessageAPI" and "no user is currently logged in" in _err(r).lower(),
        _login_hint("message_login"),
    ),
    _rule(
        "receiver",
        ("send_message",),
        _matches("receiver id .* not found"),
        lambda r, w: "Receiver ids are user ids, not names: call 'get_user_id' with the user's name first.",
    ),
    _rule(
        "brake",
        ("startEngine",),
        _matches("brake"),
        lambda r, w: (
            "Press the brake fully first: pressBrakePedal(pedalPosition=1.0), then start the engine."
        ),
    ),
    _rule(
        "doors",
        ("startEngine",),
        _matches("doors must be locked"),
        lambda r, w: "Lock every door first with lockDoors(unlock=False, door=[...the unlocked doors...]).",
    ),
    _rule(
        "cruise",
        ("setCruiseControl",),
        _matches("start the engine"),
        lambda r, w: (
            "Start the engine (startEngine with ignitionMode='START') before setting cruise control."
        ),
    ),
    # Any tool: wrong parameter names or missing required ones.
    _rule(
        "signature",
        (),
        lambda r, w: (
            w.has(r.call.name)
            and bool(re.search("unexpected keyword argument|missing \\d+ required", r.text))
        ),
        _signature_hint,
    ),
)


def find_hint(
    result: ExecResult, world: BfclWorld, rules: tuple[HintRule, ...] = HINTS
) -> tuple[str, str] | None:
    """(rule name, hint text) for a failed call, or None when no rule applies."""
    if not result.error:
        return None
    for rule in rules:
        if rule.methods and result.call.name not in rule.methods:
            continue
        if rule.when(result, world):
            return rule.name, rule.hint(result, world)
    return None


def augment(
    result: ExecResult, world: BfclWorld, rules: tuple[HintRule, ...] = HINTS
) -> tuple[str, str | None]:
    """The observation shown to the policy and the rule that fired (None: unchanged).

    A JSON object result gains a "hint" key; any other result gets a "hint: ..." line.
    """
    found = find_hint(result, world, rules)
    if found is None:
        return result.text, None
    name, hint = found
    if isinstance(result.value, dict):
        try:
            return json.dumps({**result.value, "hint": hint}), name
        except (TypeError, ValueError):
            pass
    return f"{result.text}\nhint: {hint}", name
