"""The small registry every stage uses: `register` a factory under a name, `create` it, `list` names."""
import difflib
import fnmatch


class UnknownNameError(KeyError):
    """Raised for a name that no registry entry has; its message lists the valid names."""

    def __str__(self):
        return self.args[0]


class Registry:
    def __init__(self, kind):
        self.kind = kind
        self._entries = {}
        self._info = {}

    def register(self, name, **info):
        def add(fn):
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = fn
            self._info[name] = info
            return fn
        return add

    def get(self, name):
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint}; choose from: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def create(self, name, **kwargs):
        return self.get(name)(**kwargs)

    def info(self, name):
        self.get(name)
        return dict(self._info[name])

    def list(self, pattern="*"):
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def __contains__(self, name):
        return name in self._entries
