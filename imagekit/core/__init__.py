"""Core, used by every stage and depending on none: one error root (:mod:`~imagekit.core.errors`), logging
and timed steps (:mod:`~imagekit.core.log`), where files live (:mod:`~imagekit.core.paths`), crash-safe
writes (:mod:`~imagekit.core.fsutil`), the one way to run a command (:mod:`~imagekit.core.run`) and Azure's
image version numbers (:mod:`~imagekit.core.versions`)."""
