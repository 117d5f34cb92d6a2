"""An example destination function: it only logs. See what it did with `destfnd deliveries`.

Copy it, point a destination at your copy (function = "functions/yours.py") and replace the
print() calls with `await fetch(...)` calls to your tool's API.
"""

from destfnd.functions import EventNotSupported

SETTINGS = {
    "greeting": {"type": "string", "required": True, "description": "printed before each event"},
}


async def on_track(event, settings):
    print(f"{settings['greeting']}: {event['event']} by {_who(event)}")


async def on_identify(event, settings):
    print(f"{settings['greeting']}: {_who(event)} is {sorted(event.get('traits') or {})}")


async def on_page(event, settings):
    print(f"{settings['greeting']}: {_who(event)} viewed {event.get('name') or 'a page'}")


async def on_screen(event, settings):
    raise EventNotSupported("this example does not handle screen events")


def _who(event):
    return event.get("userId") or event.get("anonymousId")
