"""One emulated machine: the kernel, livepatch, and the tree that is mounted.

The tree's root holds `sys/` (kernel/livepatch, kernel/debug, module),
`proc/` and `dev/kmsg`.  The control server and the FUSE layer both work on
this object, from the one trio thread that owns it.
"""

from __future__ import annotations

from klpfs.fs.kmsg import KMSG_SIZE, Kmsg
from klpfs.fs.procfs import ProcFs
from klpfs.kernel.dyndbg_query import GENERATIONS
from klpfs.kernel.kallsyms import FUNCTION_PADDING_BYTES
from klpfs.kernel.kallsyms_file import SymbolFile
from klpfs.kernel.kernel import Kernel
from klpfs.livepatch.core import Livepatch
from klpfs.modules.program import Structures
from klpfs.profile_image import boot_image, fork_frames
from klpfs.profiles import Rule, get_profile
from klpfs.sysfs.debugfs import debugfs_mount, dynamic_debug_init_control
from klpfs.sysfs.kernfs import Kernfs
from klpfs.sysfs.module import ModuleSysfs
from klpfs.sysfs.tracefs import tracefs_mounts


class System:
    """Construct inside trio (the kernel's clock is trio's); ValueError for an unknown version."""

    def __init__(self, kernel_version: str = "4.15", reliable_stacks: bool = True, speed: float = 1.0,
                 release: str | None = None, symbols: SymbolFile | None = None,
                 module_layout_crc: int | None = None) -> None:
        """`release` names another build of the profile's kernel (--release); `symbols`
        is that build's symbol table (--kallsyms), vmlinux's instead of the image's;
        `module_layout_crc` its CRC of module_layout (--symvers)."""
        self.profile = profile = get_profile(kernel_version).built_as(release, module_layout_crc=module_layout_crc)
        padding = FUNCTION_PADDING_BYTES if profile.has(Rule.CALL_PADDING) else 0
        image = boot_image(profile)
        image.symbols = symbols
        self.kernel = Kernel(profile.release, image, module_sig_messages=profile.module_sig_messages,
                             speed=speed, padding=padding)
        self.kernel.sched.fork_frames = fork_frames(profile)
        self.kernel.modules.module_memory = profile.has(Rule.MODULE_MEMORY)
        self.kernel.dyndbg.features = GENERATIONS[self.profile.dyndbg]
        self.kernel.oops_style = self.profile.oops_style
        self.kernel.package_id = self.profile.package_id
        self.kernel.preemptible = "preempt" in self.profile.vermagic_flags.split()
        self.kernel.modules.force_unload = self.profile.module_force_unload
        self.kernfs = Kernfs()
        root = self.kernfs.root
        sys_dir = self.kernfs.create_dir(root, "sys")
        self.kernel_kobj = self.kernfs.create_dir(sys_dir, "kernel")
        """/sys/kernel, where modules add kobjects (kobject_create_and_add(..., kernel_kobj))."""
        self.livepatch = Livepatch(self.kernel, self.profile, self.kernfs, self.kernel_kobj, reliable_stacks)
        self.module_sysfs = ModuleSysfs(self.kernfs, self.kernfs.create_dir(sys_dir, "module"),
                                        self.kernel.modules)
        self.structures = Structures()
        """What loaded module code allocates (module files' `new`/`for_each`)."""
        proc = self.kernfs.create_dir(root, "proc", 0o555)
        self.procfs = ProcFs(self.kernfs, proc, self.kernel)
        debugfs = debugfs_mount(self.kernfs, self.kernel_kobj)
        dynamic_debug_init_control(self.kernfs, debugfs, proc, self.kernel.dyndbg)
        ftrace, kallsyms = self.kernel.ftrace, self.kernel.kallsyms
        tracefs_mounts(self.kernfs, self.kernel_kobj, debugfs,
                       lambda: ftrace.enabled_functions(kallsyms.lookup, self.profile.ftrace_show),
                       self.profile.trace_mode_read)
        self.kmsg = Kmsg(self.kernel.log, self.kernel.now)
        self.kernfs.create_file(self.kernfs.create_dir(root, "dev"), "kmsg", 0o644, size=KMSG_SIZE,
                                fops=self.kmsg)

    async def run(self) -> None:
        """Run the kernel's background work (timers, the transition retry) until cancelled."""
        await self.kernel.timers.run()
