"""The VM, in layers: QEMU's argv as a pure function (:mod:`~imagekit.vm.qemu`), the runner that starts it
in a private network namespace and always cleans up (:mod:`~imagekit.vm.runner`: ``VM``, ``GuestNetwork``),
the namespace's own process with its relay and DNS (:mod:`~imagekit.vm.netns`, run as ``python -m``), SSH
(:mod:`~imagekit.vm.ssh`), the guest protocol every check talks through (:mod:`~imagekit.vm.guest`) and the
records of VMs kept running with ``--keep`` (:mod:`~imagekit.vm.kept`; their fabric is served by
:mod:`imagekit.fabric.keeper`).

Import the submodules themselves: this face imports nothing, so ``python -m imagekit.vm.netns`` starts clean.
"""
