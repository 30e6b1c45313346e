#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    // Memory freed by requests is kept for mimalloc's purge delay (1 s by
    // default in mimalloc 3; `MIMALLOC_PURGE_DELAY`, in ms, changes it), so
    // that a request's pages are reused by the next one instead of going
    // back to the OS and faulting in again (with a delay of 0, a GraphQL
    // query cost one madvise and fresh zeroed pages every other request).
    // The 19 MiB of an argon2 hash is the exception: its thread may then sit
    // idle, so it collects at once.
    // SAFETY: mi_collect only releases the calling thread's free memory.
    let _ = api::auth::RELEASE_MEMORY.set(|| unsafe { libmimalloc_sys::mi_collect(true) });
    api::cli::main()
}
