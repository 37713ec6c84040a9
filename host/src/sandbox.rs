//! One call's sandbox: a fresh Wasmtime instance of the interpreter, the capabilities it is
//! given (grants, environment), the limits it runs under, and the door it talks through.
//!
//! Nothing reaches the guest that is not handed to it here: no network (WASI preview 1 has no
//! way to open a socket, and none is preopened), no host file outside the standard library and
//! the user's grants, no environment variable not given with `--env`. This module is the one
//! place host opens host paths on the guest's behalf.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use wasmtime::{Caller, InstancePre, Linker, Module, ResourceLimiter, Store, Trap};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::cache::CacheDir;
use crate::door::{Door, Script};
use crate::engine::{CALL_STACK, Engine, EngineSettings, TICK};
use crate::error::bad_input;
use crate::image::{self, Image};
use crate::memory;
use crate::policy::{LimitExceeded, Limits, Policy};
use crate::record::{self, Divergence, DoorStep, Mode, Traced, Tracing};
use crate::runtime::{RESET_PREOPENS, Runtime, STDLIB_GUEST_DIR};

/// What a run leaves: how it ended, the door's record and the guest's output streams (what
/// was written before a limit stopped it included).
pub struct Run {
    pub ended: Ended,
    pub door: Door,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The mode the run was given, with what it recorded or how far it replayed.
    pub mode: Mode,
    /// The linear memory as the turns left it, when asked for.
    pub memory: Option<Vec<u8>>,
}

/// How a run ended, short of a failure of host or the interpreter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Every turn ran to its end.
    Finished,
    /// A limit stopped it.
    Limit(LimitExceeded),
    /// The guest called WASI's `proc_exit` (Python's `os._exit`).
    Exit(i32),
    /// The interpreter trapped (`os.abort()`, a fatal signal, a fatal error): the guest's
    /// doing, said as Wasmtime describes the trap.
    Crashed(String),
    /// A replay went another way than the recording.
    Diverged(Divergence),
}

/// An interpreter ready to instantiate, with its imports linked once: directly, and through
/// the tracer (for recording, replaying, and building images that are the same everywhere).
pub struct Sandbox {
    engine: wasmtime::Engine,
    settings: EngineSettings,
    runtime: Runtime,
    module: Module,
    /// The real WASI functions (and the door), which the traced ones call through the shim.
    linker: Arc<Linker<State>>,
    pre: InstancePre<State>,
    traced: OnceLock<InstancePre<State>>,
    /// The interpreter's initial memory, which [`Start::Fresh`] instances start from.
    initial: Image,
    cache: CacheDir,
}

/// Where an instance's memory starts.
#[derive(Clone, Copy)]
pub(crate) enum Start<'a> {
    /// The interpreter module's own initial memory.
    Fresh,
    /// A pre-initialised image of a bundle.
    Image(&'a Image),
}

/// What the guest's WASI world is made of: each [`Mode`] implies one.
enum World {
    /// The host's clocks and random source, the standard library and the policy's grants.
    Live,
    /// As `Live` without grants, with a fixed clock and a fixed random sequence: for
    /// pre-initialised images, which must be the same on every machine.
    Fixed,
    /// Nothing but the policy's environment: a replay answers every other import itself.
    Replay,
}

impl World {
    fn of(mode: &Mode) -> World {
        match mode {
            Mode::Plain | Mode::Record(_) | Mode::WhatIf(_) => World::Live,
            Mode::Freeze => World::Fixed,
            Mode::Replay(_) => World::Replay,
        }
    }
}

/// How to run: the options of [`Sandbox::execute`].
pub(crate) struct Setup<'a> {
    pub start: Start<'a>,
    pub mode: Mode,
    /// Keep a copy of the linear memory the turns leave (to save as an image).
    pub capture: bool,
}

/// Per-call store data.
struct State {
    wasi: WasiP1Ctx,
    limiter: Limiter,
    door: Door,
    output_limit: u64,
    streams: Streams,
    tracing: Tracing,
    /// The guest's clocks, which `poll_oneoff` reads too.
    clocks: Clocks,
    /// When the call's time limit runs out, and the limit.
    deadline: (Instant, Duration),
}

impl Traced for State {
    fn tracing(&mut self) -> &mut Tracing {
        &mut self.tracing
    }

    fn echo(&mut self, fd: i64, bytes: &[u8]) -> wasmtime::Result<()> {
        let which = if fd == 1 {
            Which::Stdout
        } else {
            Which::Stderr
        };
        self.streams
            .write(which, bytes)
            .map_err(wasmtime::Error::new)
    }
}

impl Sandbox {
    /// Loads the runtime's interpreter (compiling it once per machine) and links its imports.
    pub fn new(engine: &Engine, runtime: &Runtime) -> Result<Sandbox> {
        let module = engine.interpreter(runtime)?;
        Self::with_module(engine, runtime, &module)
    }

    /// A sandbox around an already compiled interpreter module.
    pub fn with_module(engine: &Engine, runtime: &Runtime, module: &Module) -> Result<Sandbox> {
        let mut linker: Linker<State> = Linker::new(engine.wasmtime());
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut State| &mut s.wasi)?;
        linker.func_wrap("host", "call", door_call)?;
        // The guest's sleeps end at the call's deadline: see `poll_oneoff`.
        linker.allow_shadowing(true);
        linker.func_wrap("wasi_snapshot_preview1", "poll_oneoff", poll_oneoff)?;
        let pre = linker.instantiate_pre(module)?;

        Ok(Sandbox {
            engine: engine.wasmtime().clone(),
            settings: engine.settings().clone(),
            runtime: runtime.clone(),
            module: module.clone(),
            linker: Arc::new(linker),
            pre,
            traced: OnceLock::new(),
            initial: image::initial_image(engine.cache(), runtime)?,
            cache: engine.cache().clone(),
        })
    }

    /// The interpreter linked through the tracer (see [`record::traced_linker`]), made on the
    /// first traced run.
    fn traced(&self) -> Result<&InstancePre<State>> {
        if let Some(pre) = self.traced.get() {
            return Ok(pre);
        }
        let mut traced = record::traced_linker(&self.module, self.linker.clone())?;
        traced.func_wrap("host", "call", door_call)?;
        let pre = traced.instantiate_pre(&self.module)?;
        Ok(self.traced.get_or_init(|| pre))
    }

    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// The settings of the engine this sandbox runs on, as a trace records them.
    pub fn engine_settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// The per-machine cache folder of the engine this sandbox was made from.
    pub fn cache(&self) -> &CacheDir {
        &self.cache
    }

    /// Runs `script` in a fresh instance under `policy`, with `door` answering the guest's
    /// requests.
    ///
    /// A limit or an exit that ends the run is said in [`Run::ended`]; a turn that fails (which
    /// host's own guest code never lets happen), a trap, or a message the door cannot read is
    /// an internal error quoting the guest's stderr.
    pub fn run(&self, policy: &Policy, door: Door, script: Script) -> Result<Run> {
        let setup = Setup {
            start: Start::Fresh,
            mode: Mode::Plain,
            capture: false,
        };
        self.execute(setup, policy, door, script)
    }

    pub(crate) fn execute(
        &self,
        setup: Setup<'_>,
        policy: &Policy,
        door: Door,
        script: Script,
    ) -> Result<Run> {
        let turns = script.turns();
        let streams = Streams::new(policy.limits.output);
        let world = World::of(&setup.mode);
        let clocks = Clocks::of(&world);
        let wasi = self.wasi(policy, &streams, &clocks, world)?;
        let state = State {
            wasi,
            limiter: Limiter {
                memory: policy.limits.memory,
            },
            door,
            output_limit: policy.limits.output,
            streams: streams.clone(),
            tracing: Tracing::new(setup.mode),
            clocks,
            deadline: (
                Instant::now() + policy.limits.timeout,
                policy.limits.timeout,
            ),
        };
        let (start, capture) = (setup.start, setup.capture);
        let run = || self.execute_here(start, &policy.limits, state, turns, &streams, capture);
        // CPython's deep recursion needs a large native stack under the wasm one: a thread
        // made by `call_thread` has it, and runs its calls in place; any other thread hands
        // each call to a new thread that has it (about 0.3 ms, nearly what a whole trivial
        // call costs: the thread's stacks are mapped and unmapped, and each unmapping
        // interrupts the other cores).
        if stack_left() >= CALL_STACK {
            return std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                .map_err(|_| anyhow!("the call panicked"))?;
        }
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("host-call".into())
                .stack_size(CALL_STACK)
                .spawn_scoped(scope, run)
                .context("failed to start the call's thread")?
                .join()
                .map_err(|_| anyhow!("the call's thread panicked"))?
        })
    }

    fn execute_here(
        &self,
        start: Start<'_>,
        limits: &Limits,
        state: State,
        turns: &[&str],
        streams: &Streams,
        capture: bool,
    ) -> Result<Run> {
        let pre = if state.tracing.mode.is_traced() {
            self.traced()?
        } else {
            &self.pre
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        let ticks = (limits.timeout.as_nanos() / TICK.as_nanos()).max(1) as u64;
        store.set_epoch_deadline(ticks + 1);
        store.epoch_deadline_trap();

        let mut captured = None;
        let outcome = (|| -> wasmtime::Result<()> {
            let image = match start {
                Start::Fresh => &self.initial,
                Start::Image(image) => image,
            };
            let instance = {
                let next = memory::starting_from(image.source());
                let instance = pre.instantiate(&mut store)?;
                if !next.taken() {
                    return Err(wasmtime::format_err!(
                        "the interpreter's memory was not made from its image"
                    ));
                }
                instance
            };
            let memory = instance
                .get_memory(&mut store, "memory")
                .ok_or_else(|| wasmtime::format_err!("the interpreter exports no memory"))?;
            image.grow_into(&mut store, memory)?;
            match start {
                Start::Fresh => {
                    if let Ok(init) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
                        init.call(&mut store, ())?;
                    }
                }
                Start::Image(_) => {
                    instance
                        .get_typed_func::<(), ()>(&mut store, RESET_PREOPENS)?
                        .call(&mut store, ())?;
                }
            }
            let alloc = instance.get_typed_func::<i32, i32>(&mut store, "host_alloc")?;
            let turn = instance.get_typed_func::<(i32, i32), i32>(&mut store, "turn")?;
            for source in turns {
                let len = i32::try_from(source.len())
                    .map_err(|_| wasmtime::format_err!("turn too large"))?;
                let ptr = alloc.call(&mut store, len)?;
                memory.write(&mut store, ptr as u32 as usize, source.as_bytes())?;
                let status = turn.call(&mut store, (ptr, len))?;
                if status != 0 {
                    return Err(wasmtime::format_err!(
                        "a turn of host's guest code failed (status {status})"
                    ));
                }
            }
            if capture {
                captured = Some(memory.data(&store).to_vec());
            }
            Ok(())
        })();

        let (stdout, stderr) = streams.take();
        let State { door, tracing, .. } = store.into_data();
        // A message host cannot read is what made the guest fail, so it is what to report.
        // host's own guest code sends none, and any code in the guest can reach the door as
        // it can any module: it is the guest's doing.
        let ended = match (door.check(), outcome) {
            (Err(malformed), _) => Ended::Crashed(format!("{malformed:#}")),
            (Ok(()), Ok(())) => Ended::Finished,
            (Ok(()), Err(e)) => classify(e, limits, &stderr)?,
        };
        Ok(Run {
            ended,
            door,
            stdout,
            stderr,
            mode: tracing.mode,
            memory: captured,
        })
    }

    /// The WASI context: the standard library read-only, the grants, the given environment,
    /// capped output streams, an empty stdin, and nothing else.
    fn wasi(
        &self,
        policy: &Policy,
        streams: &Streams,
        clocks: &Clocks,
        world: World,
    ) -> Result<WasiP1Ctx> {
        let mut b = WasiCtxBuilder::new();
        b.stdout(streams.handle(Which::Stdout))
            .stderr(streams.handle(Which::Stderr))
            .allow_blocking_current_thread(true)
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        for (k, v) in &policy.env {
            b.env(k, v);
        }
        b.wall_clock(SharedWall(clocks.wall.clone()))
            .monotonic_clock(SharedMonotonic(clocks.monotonic.clone()));
        match world {
            World::Replay => return Ok(b.build_p1()),
            World::Fixed => {
                b.secure_random(wasmtime_wasi::Deterministic::new(FIXED_RANDOM.to_vec()))
                    .insecure_random(wasmtime_wasi::Deterministic::new(FIXED_RANDOM.to_vec()))
                    .insecure_random_seed(0);
            }
            World::Live => {}
        }
        b.preopened_dir(
            self.runtime.stdlib_dir(),
            STDLIB_GUEST_DIR,
            FsPerms::ReadOnly,
        )
        .map_err(anyhow::Error::from)
        .with_context(|| {
            format!(
                "failed to open the runtime's `{}`",
                self.runtime.stdlib_dir().display()
            )
        })?;
        if matches!(world, World::Live) {
            for grant in &policy.grants {
                check_grant_dir(&grant.host)?;
                let perms = if grant.writable {
                    FsPerms::ReadWrite
                } else {
                    FsPerms::ReadOnly
                };
                b.preopened_dir(&grant.host, &grant.guest, perms)
                    .map_err(|e| {
                        bad_input(format!(
                            "--grant: cannot open `{}`: {e}",
                            grant.host.display()
                        ))
                    })?;
            }
        }
        Ok(b.build_p1())
    }
}

/// The random bytes of a [`World::Fixed`] instance: any fixed sequence would do.
const FIXED_RANDOM: [u8; 32] = *b"host: the same image everywhere.";

/// A clock that starts at 2000-01-01 and advances one microsecond per reading, for
/// [`World::Fixed`] instances.
#[derive(Default)]
struct FixedClock(std::sync::atomic::AtomicU64);

impl FixedClock {
    fn tick(&self) -> u64 {
        self.0
            .fetch_add(1_000, std::sync::atomic::Ordering::Relaxed)
    }
}

impl wasmtime_wasi::HostWallClock for FixedClock {
    fn resolution(&self) -> Duration {
        Duration::from_micros(1)
    }
    fn now(&self) -> Duration {
        Duration::from_secs(946_684_800) + Duration::from_nanos(self.tick())
    }
}

impl wasmtime_wasi::HostMonotonicClock for FixedClock {
    fn resolution(&self) -> u64 {
        1_000
    }
    fn now(&self) -> u64 {
        self.tick()
    }
}

/// The clocks a run's guest reads, shared with `poll_oneoff`, which must measure a sleep to
/// an absolute time on the same clock the guest read it from.
struct Clocks {
    wall: Arc<dyn wasmtime_wasi::HostWallClock + Send + Sync>,
    monotonic: Arc<dyn wasmtime_wasi::HostMonotonicClock + Send + Sync>,
}

impl Clocks {
    fn of(world: &World) -> Clocks {
        match world {
            // Two clocks, each advancing per reading, as images have always been made.
            World::Fixed => Clocks {
                wall: Arc::new(FixedClock::default()),
                monotonic: Arc::new(FixedClock::default()),
            },
            World::Live | World::Replay => Clocks {
                wall: Arc::new(wasmtime_wasi::clocks::WallClock::new()),
                monotonic: Arc::new(wasmtime_wasi::clocks::MonotonicClock::new()),
            },
        }
    }
}

struct SharedWall(Arc<dyn wasmtime_wasi::HostWallClock + Send + Sync>);

impl wasmtime_wasi::HostWallClock for SharedWall {
    fn resolution(&self) -> Duration {
        self.0.resolution()
    }
    fn now(&self) -> Duration {
        self.0.now()
    }
}

struct SharedMonotonic(Arc<dyn wasmtime_wasi::HostMonotonicClock + Send + Sync>);

impl wasmtime_wasi::HostMonotonicClock for SharedMonotonic {
    fn resolution(&self) -> u64 {
        self.0.resolution()
    }
    fn now(&self) -> u64 {
        self.0.now()
    }
}

/// WASI's `poll_oneoff(subscriptions, events, count, nevents) -> errno`, in place of
/// Wasmtime's, which blocks the thread for as long as the guest asks: epoch interruption
/// stops wasm code, not a host call, so `time.sleep(10**6)` would outlive any `--timeout`.
/// Here a sleep never goes past the call's deadline; reaching it ends the call with the time
/// limit.
///
/// Clock subscriptions (realtime and monotonic, relative or absolute) wait as asked. The
/// sandbox's descriptors are files and in-memory streams, which never block, so a descriptor
/// subscription is ready at once (Wasmtime reports the same for them), and the call returns
/// without sleeping.
fn poll_oneoff(
    mut caller: Caller<'_, State>,
    subscriptions: i32,
    events: i32,
    count: i32,
    nevents: i32,
) -> wasmtime::Result<i32> {
    const EINVAL: i32 = 28;
    const EFAULT: i32 = 21;
    const SUBSCRIPTION: usize = 48;
    const EVENT: usize = 32;
    let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
        return Ok(EFAULT);
    };
    let count = count as u32 as usize;
    if count == 0 {
        return Ok(EINVAL);
    }
    let mut subs = vec![0u8; count.saturating_mul(SUBSCRIPTION)];
    if memory
        .read(&caller, subscriptions as u32 as usize, &mut subs)
        .is_err()
    {
        return Ok(EFAULT);
    }
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    // How long each subscription waits from now (None: never, for an unknown clock).
    let mut waits = Vec::with_capacity(count);
    for sub in subs.chunks_exact(SUBSCRIPTION) {
        let wait = match sub[8] {
            0 => {
                let clock = u32::from_le_bytes(sub[16..20].try_into().unwrap());
                let timeout = u64_at(sub, 24);
                let absolute = sub[40] & 1 != 0;
                let now = match clock {
                    0 => caller.data().clocks.wall.now().as_nanos() as u64,
                    1 => caller.data().clocks.monotonic.now(),
                    _ => return Ok(EINVAL),
                };
                Duration::from_nanos(if absolute {
                    timeout.saturating_sub(now)
                } else {
                    timeout
                })
            }
            1 | 2 => Duration::ZERO,
            _ => return Ok(EINVAL),
        };
        waits.push(wait);
    }
    let first = *waits.iter().min().expect("at least one subscription");
    let (deadline, limit) = caller.data().deadline;
    let left = deadline.saturating_duration_since(Instant::now());
    if first > left {
        std::thread::sleep(left);
        return Err(wasmtime::Error::new(LimitExceeded::Time(limit)));
    }
    if !first.is_zero() {
        std::thread::sleep(first);
    }
    let mut out = Vec::new();
    for (sub, wait) in subs.chunks_exact(SUBSCRIPTION).zip(&waits) {
        if *wait > first {
            continue;
        }
        let mut event = [0u8; EVENT];
        event[..8].copy_from_slice(&sub[..8]); // userdata
        event[10] = sub[8]; // the subscription's kind; error 0
        event[16..24].copy_from_slice(&1u64.to_le_bytes()); // nbytes, as Wasmtime reports
        out.extend_from_slice(&event);
    }
    let ready = (out.len() / EVENT) as u32;
    if memory
        .write(&mut caller, events as u32 as usize, &out)
        .and_then(|()| memory.write(&mut caller, nevents as u32 as usize, &ready.to_le_bytes()))
        .is_err()
    {
        return Ok(EFAULT);
    }
    Ok(0)
}

/// A thread that runs host's calls in place, without a thread of their own per call: for a
/// server's workers or an evaluation's threads, which make call after call.
pub fn call_thread(name: String) -> std::thread::Builder {
    // Headroom over what a call needs for the caller's own frames above it.
    std::thread::Builder::new()
        .name(name)
        .stack_size(CALL_STACK + (1 << 20))
}

/// From now on, a call that ends on this thread leaves its memory to be reset at this
/// thread's next [`settle`] (or at the start of its next call), not as it returns: a server's
/// worker answers first and resets after. Memories are only ever handed out reset.
pub fn defer_resets() {
    memory::defer_resets();
}

/// Resets the memory this thread's last call left, if [`defer_resets`] left one.
pub fn settle() {
    memory::settle();
}

/// How many bytes of native stack this thread has left below the caller's frame.
fn stack_left() -> usize {
    thread_local! {
        /// The lowest address of this thread's stack, once asked (0 until then).
        static LOWEST: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
    let lowest = LOWEST.with(|cell| {
        if cell.get() == 0 {
            cell.set(stack_lowest().unwrap_or(usize::MAX));
        }
        cell.get()
    });
    let here = 0u8;
    (std::ptr::from_ref(&here) as usize).saturating_sub(lowest)
}

/// The lowest usable address of this thread's stack, as the C library knows it; None when it
/// cannot say (then every call gets a thread of its own).
fn stack_lowest() -> Option<usize> {
    // SAFETY: `attr` is initialised by `pthread_getattr_np` before it is read, and destroyed
    // once; the calls only read this thread's own attributes.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let mut base: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let got = libc::pthread_attr_getstack(&attr, &mut base, &mut size);
        libc::pthread_attr_destroy(&mut attr);
        (got == 0 && !base.is_null()).then_some(base as usize)
    }
}

fn check_grant_dir(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(bad_input(format!(
            "--grant: `{}` is not a directory",
            path.display()
        ))),
        Err(e) => Err(bad_input(format!(
            "--grant: cannot open `{}`: {e}",
            path.display()
        ))),
    }
}

/// Sorts a failed run: a limit by name, an exit, a trap, or else an internal error.
fn classify(e: wasmtime::Error, limits: &Limits, stderr: &[u8]) -> Result<Ended> {
    if let Some(limit) = e.downcast_ref::<LimitExceeded>() {
        return Ok(Ended::Limit(*limit));
    }
    if let Some(divergence) = e.downcast_ref::<Divergence>() {
        return Ok(Ended::Diverged(divergence.clone()));
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => return Ok(Ended::Limit(LimitExceeded::Time(limits.timeout))),
        Some(Trap::StackOverflow) => return Ok(Ended::Limit(LimitExceeded::Stack)),
        // Only the interpreter's own code traps (abort() is `unreachable`): what the guest
        // did ended it, not a fault of host's.
        Some(trap) => return Ok(Ended::Crashed(trap.to_string())),
        None => {}
    }
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Ok(Ended::Exit(exit.0));
    }
    let text = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    Err(anyhow::Error::from(e).context(format!("the interpreter failed; its last output:\n{tail}")))
}

/// `host::call(ptr, len, out_ptr_ptr, out_len_ptr) -> i32`: 0 with the answer written to
/// memory from the guest's `host_alloc`; -2 when the request is malformed or unknown. Traced
/// like a WASI import: a replay answers from the trace (and still collects what the guest
/// hands back).
fn door_call(
    mut caller: Caller<'_, State>,
    ptr: i32,
    len: i32,
    out_ptr_ptr: i32,
    out_len_ptr: i32,
) -> wasmtime::Result<i32> {
    const FAULT: i32 = -2;
    let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
        return Ok(FAULT);
    };
    if len as u32 as u64 > caller.data().output_limit {
        return Err(wasmtime::Error::new(LimitExceeded::Output(
            caller.data().output_limit,
        )));
    }
    let mut request = vec![0; len as u32 as usize];
    if memory
        .read(&caller, ptr as u32 as usize, &mut request)
        .is_err()
    {
        return Ok(FAULT);
    }
    let args = [ptr, len, out_ptr_ptr, out_len_ptr].map(i64::from);
    let (status, answer) = match caller.data_mut().tracing.door_before(&args, &request)? {
        DoorStep::Answer(status, answer) => {
            caller.data_mut().door.handle(&request);
            (status, answer)
        }
        DoorStep::Live => {
            let answer = caller.data_mut().door.handle(&request);
            let status = if answer.is_some() { 0 } else { FAULT };
            caller
                .data_mut()
                .tracing
                .door_after(args.to_vec(), &request, status, answer.as_deref())
                .map_err(wasmtime::Error::new)?;
            (status, answer)
        }
    };
    let Some(answer) = answer.filter(|_| status == 0) else {
        return Ok(status);
    };
    let Some(alloc) = caller.get_export("host_alloc").and_then(|e| e.into_func()) else {
        return Ok(FAULT);
    };
    let alloc = alloc.typed::<i32, i32>(&caller)?;
    let out = alloc.call(&mut caller, answer.len().max(1) as i32)? as u32 as usize;
    if out == 0 || memory.write(&mut caller, out, &answer).is_err() {
        return Ok(FAULT);
    }
    let addr = (out as u32).to_le_bytes();
    let size = (answer.len() as u32).to_le_bytes();
    if memory
        .write(&mut caller, out_ptr_ptr as u32 as usize, &addr)
        .is_err()
        || memory
            .write(&mut caller, out_len_ptr as u32 as usize, &size)
            .is_err()
    {
        return Ok(FAULT);
    }
    Ok(0)
}

/// Caps linear memory; growing past the cap ends the call at once, naming the limit, rather
/// than handing Python a `MemoryError` it might swallow.
struct Limiter {
    memory: u64,
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory {
            return Err(wasmtime::Error::new(LimitExceeded::Memory(self.memory)));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 10_000_000)
    }
}

/// The guest's stdout and stderr, captured in memory under one shared byte budget.
#[derive(Clone)]
struct Streams(Arc<Mutex<Captured>>);

#[derive(Default)]
struct Captured {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    budget: u64,
}

#[derive(Clone, Copy)]
enum Which {
    Stdout,
    Stderr,
}

#[derive(Clone)]
struct StreamHandle {
    streams: Streams,
    which: Which,
}

impl Streams {
    fn new(budget: u64) -> Streams {
        Streams(Arc::new(Mutex::new(Captured {
            budget,
            ..Default::default()
        })))
    }

    fn handle(&self, which: Which) -> StreamHandle {
        StreamHandle {
            streams: self.clone(),
            which,
        }
    }

    fn take(&self) -> (Vec<u8>, Vec<u8>) {
        let mut c = self.0.lock().unwrap();
        (std::mem::take(&mut c.stdout), std::mem::take(&mut c.stderr))
    }

    fn write(&self, which: Which, bytes: &[u8]) -> Result<(), LimitExceeded> {
        let mut c = self.0.lock().unwrap();
        let used = (c.stdout.len() + c.stderr.len()) as u64;
        let room = c.budget.saturating_sub(used) as usize;
        let limit = c.budget;
        let buf = match which {
            Which::Stdout => &mut c.stdout,
            Which::Stderr => &mut c.stderr,
        };
        // Keep what fits, so the user sees the start of the flood.
        buf.extend_from_slice(&bytes[..bytes.len().min(room)]);
        if bytes.len() > room {
            Err(LimitExceeded::Output(limit))
        } else {
            Ok(())
        }
    }
}

impl IsTerminal for StreamHandle {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StreamHandle {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StreamHandle {
    async fn ready(&mut self) {}
}

impl OutputStream for StreamHandle {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.streams
            .write(self.which, &bytes)
            .map_err(|limit| StreamError::Trap(wasmtime::Error::new(limit)))
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(1 << 20)
    }
}

impl tokio::io::AsyncWrite for StreamHandle {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(
            self.streams
                .write(self.which, buf)
                .map(|()| buf.len())
                .map_err(|limit| std::io::Error::other(limit.to_string())),
        )
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_thread_runs_calls_in_place_and_another_thread_does_not() {
        let in_place = call_thread("test-call".into())
            .spawn(stack_left)
            .unwrap()
            .join()
            .unwrap();
        assert!(in_place >= CALL_STACK, "{in_place} bytes left");
        let other = std::thread::Builder::new()
            .stack_size(4 << 20)
            .spawn(stack_left)
            .unwrap()
            .join()
            .unwrap();
        assert!(other < 4 << 20 && other > 3 << 20, "{other} bytes left");
    }

    #[test]
    fn output_budget_is_shared_and_keeps_what_fits() {
        let s = Streams::new(10);
        s.write(Which::Stdout, b"hello").unwrap();
        assert_eq!(
            s.write(Which::Stderr, b"world!!"),
            Err(LimitExceeded::Output(10))
        );
        let (out, err) = s.take();
        assert_eq!(
            (out.as_slice(), err.as_slice()),
            (&b"hello"[..], &b"world"[..])
        );
    }
}
