#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v2 and v3): milliseconds freed
/// memory is kept before it goes back to the OS.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Give freed memory back at once. Each login's argon2 hash takes 19 MiB on
    // a blocking thread that may then sit idle and never purge it (measured:
    // idle RSS 49 -> 36 MiB, peak during a login burst 109 -> 89 MiB).
    // MIMALLOC_PURGE_DELAY, when set, wins.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets a process-wide option before any other thread exists.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    }
    api::cli::main()
}
