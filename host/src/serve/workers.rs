//! A bounded pool of worker threads fed from per-tenant queues, served in turn.
//!
//! Why not one shared queue: a tenant that floods it would make every other tenant wait
//! behind its calls. Here each tenant has its own queue and its own cap on calls running at
//! once (`concurrency`); a free worker takes the next call of the next tenant in the ring
//! that has one waiting and is under its cap, so one tenant's flood cannot hold more than
//! its `concurrency` workers, and the others' calls start as soon as a worker is free.
//!
//! A place in a tenant's queue is reserved ([`Pool::reserve`]) before its run row is
//! written, so a call refused for being over `concurrency + queue` (429) leaves no row.
//!
//! Background work (an evaluation's runs, one job each: see `evaluations`) waits in a second
//! queue per tenant, under the same `concurrency`, and takes no queue place. Calls go first:
//! a free worker takes background work when no call can start, and also when none is running
//! and the last job taken was a call, so an evaluation moves on (on about one worker, taking
//! turns with calls) even under a steady stream of calls. A call then waits for a worker at
//! most one evaluation run, never for a whole evaluation.
//!
//! A worker resets a call's memory after it has handed over the answer. A call queued while
//! it does waits for it rather than waking an idle worker, when its resets have been brief
//! (see [`BRIEF_SETTLE`]): measured with one client of the pandas example, a call run on the
//! other worker beside that reset took 1.3 ms longer (8.9 ms against 7.5 ms, median) than one
//! that waited for the warm worker, and the client got 17% more calls per second; on a
//! machine three times slower, 3.3 ms longer (33.1 against 29.8 ms) beside a 1.7 ms reset.
//! Only as many calls wait as there are workers resetting: any more wake idle workers.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::runner::{defer_resets, settle, worker_thread};

/// A queued call: it runs, and gives back what hands its value to the waiting request, which
/// the worker calls only once the call's place is free again (so a client that sends its
/// next call as soon as it has the answer finds the place it just used).
type Job = Box<dyn FnOnce() -> Box<dyn FnOnce() + Send> + Send>;

/// A background job: it answers no one.
type Background = Box<dyn FnOnce() + Send>;

/// How brief a worker's last reset must have been for a call queued during its next to wait
/// for it: at most this, or at most the time of the call it follows divided by
/// [`SETTLE_SHARE`]. Running beside a reset on another worker costs a call about the reset's
/// time and more (see the module's doc), so waiting costs no more than it saves; and a reset
/// that is a small share of its call delays the next by only that share (an eighth at most),
/// however fast the machine. A fixed bound alone does not carry over: the pandas example's
/// 1.2 ms reset took 1.7-2.1 ms on a slower machine, and a third of its calls went to the
/// cold worker.
const BRIEF_SETTLE: Duration = Duration::from_millis(2);
const SETTLE_SHARE: u32 = 8;

/// What a worker took.
enum Work {
    Call(Job),
    Background(Background),
}

/// The pool's threads and queues.
pub struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// One per worker: a job wakes the worker that went idle last, whose stack, caches and
    /// core are the warmest, rather than all of them or the one idle longest.
    wakes: Vec<Condvar>,
    /// What a worker does after answering (the memory reset), and how brief it must have
    /// been the last time for a queued call to wait for it.
    settle: fn(),
    brief: Duration,
}

struct State {
    tenants: Vec<Queue>,
    /// The next tenant to serve first: it moves on by one after each pick.
    turn: usize,
    /// The same for background work.
    background_turn: usize,
    /// Whether the last job a worker took was background work.
    took_background: bool,
    /// The workers waiting for work, the one that went idle last at the end.
    idle: Vec<usize>,
    /// How many workers are resetting the memory of the call they answered, their last reset
    /// brief: as many jobs as that wake no idle worker, as those take them next.
    settling: usize,
}

struct Queue {
    jobs: VecDeque<Job>,
    background: VecDeque<Background>,
    running: usize,
    background_running: usize,
    /// Places taken: reserved, queued or running.
    held: usize,
    concurrency: usize,
    places: usize,
}

/// A reserved place in a tenant's queue; dropped unused, it is given back.
pub struct Ticket {
    shared: Arc<Shared>,
    tenant: usize,
    used: bool,
}

impl Pool {
    /// Starts `workers` threads; `tenants` gives each tenant's `(concurrency, queue)`, in
    /// the order of the tenants' indices.
    pub fn new(workers: usize, tenants: &[(usize, usize)]) -> Pool {
        Pool::with_settle(workers, tenants, settle, BRIEF_SETTLE)
    }

    fn with_settle(
        workers: usize,
        tenants: &[(usize, usize)],
        settle: fn(),
        brief: Duration,
    ) -> Pool {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                tenants: tenants
                    .iter()
                    .map(|&(concurrency, queue)| Queue {
                        jobs: VecDeque::new(),
                        background: VecDeque::new(),
                        running: 0,
                        background_running: 0,
                        held: 0,
                        concurrency,
                        places: concurrency + queue,
                    })
                    .collect(),
                turn: 0,
                background_turn: 0,
                took_background: false,
                idle: Vec::with_capacity(workers),
                settling: 0,
            }),
            wakes: (0..workers).map(|_| Condvar::new()).collect(),
            settle,
            brief,
        });
        for i in 0..workers {
            let shared = shared.clone();
            worker_thread(format!("host-worker-{i}"))
                .spawn(move || shared.work(i))
                .expect("failed to start a worker thread");
        }
        Pool { shared }
    }

    /// A place for one call of `tenant`, or None when it already has `concurrency + queue`
    /// calls running or waiting.
    pub fn reserve(&self, tenant: usize) -> Option<Ticket> {
        let mut state = self.shared.lock();
        let q = &mut state.tenants[tenant];
        if q.held >= q.places {
            return None;
        }
        q.held += 1;
        state.publish();
        Some(Ticket {
            shared: self.shared.clone(),
            tenant,
            used: false,
        })
    }

    /// Calls running and calls waiting, over all tenants (background work is not counted).
    pub fn load(&self) -> (usize, usize) {
        self.shared.lock().load()
    }

    /// Queues background work for `tenant`, run when no call waits (see the module's doc).
    pub fn background(&self, tenant: usize, f: impl FnOnce() + Send + 'static) {
        let mut state = self.shared.lock();
        state.tenants[tenant].background.push_back(Box::new(f));
        self.shared.wake_one(&mut state);
    }
}

impl Ticket {
    /// Queues `f` in the ticket's place; the receiver gets its value once a worker ran it.
    pub fn run<T: Send + 'static>(
        mut self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> oneshot::Receiver<T> {
        let (tx, rx) = oneshot::channel();
        self.used = true;
        let mut state = self.shared.lock();
        state.tenants[self.tenant].jobs.push_back(Box::new(move || {
            let value = f();
            // The receiver is gone only when the client hung up; the call's row is complete
            // either way.
            Box::new(move || {
                let _ = tx.send(value);
            })
        }));
        state.publish();
        self.shared.wake_one(&mut state);
        rx
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.used {
            let mut state = self.shared.lock();
            state.tenants[self.tenant].held -= 1;
            state.publish();
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the worker that went idle last, if one is idle and no settling worker is about
    /// to take the job (see [`State::settling`]).
    fn wake_one(&self, state: &mut State) {
        if state.startable() <= state.settling {
            return;
        }
        if let Some(worker) = state.idle.pop() {
            self.wakes[worker].notify_one();
        }
    }

    /// Worker `me`'s life: take the next job in turn, run it, give its place back; wait
    /// when there is none that can start.
    fn work(&self, me: usize) {
        defer_resets();
        // How long this worker's last reset took; none yet counts as brief.
        let mut last_settle = Duration::ZERO;
        let mut state = self.lock();
        loop {
            let Some((tenant, work)) = state.next() else {
                state.idle.push(me);
                state = self.wakes[me]
                    .wait_while(state, |s| s.idle.contains(&me))
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            };
            // More that can start than this worker takes: another worker for it, unless a
            // settling one takes it next. (Each job queued wakes one worker; a job that could
            // not start then, its tenant at its cap, can when that tenant's running job ends,
            // and the worker that ran it takes it.)
            self.wake_one(&mut state);
            state.publish();
            drop(state);
            match work {
                Work::Call(job) => {
                    // A panicking job must not take its worker with it; its caller sees the
                    // dropped sender as an internal error.
                    let taken = Instant::now();
                    let deliver = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    let ran = taken.elapsed();
                    state = self.lock();
                    let q = &mut state.tenants[tenant];
                    q.running -= 1;
                    q.held -= 1;
                    let brief = last_settle <= self.brief.max(ran / SETTLE_SHARE);
                    if brief {
                        state.settling += 1;
                    }
                    state.publish();
                    drop(state);
                    if let Ok(deliver) = deliver {
                        deliver();
                    }
                    // The call's memory is reset once its answer is on its way. A reset that
                    // panicked must not leave this worker marked settling: no job would wake
                    // the others again.
                    let started = Instant::now();
                    let _ = std::panic::catch_unwind(self.settle);
                    last_settle = started.elapsed();
                    state = self.lock();
                    if brief {
                        state.settling -= 1;
                    }
                }
                Work::Background(job) => {
                    // Background work reports its own failures; a panic only ends the job.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    // Nor a failed reset, which would leave the tenant a place short.
                    let _ = std::panic::catch_unwind(self.settle);
                    state = self.lock();
                    state.tenants[tenant].background_running -= 1;
                }
            }
        }
    }
}

impl State {
    /// The next job: a call of the first tenant, from `turn` on, that has one waiting and is
    /// under its `concurrency`; else background work likewise. Background work goes first
    /// when none is running and the last job taken was a call, so it always moves on, taking
    /// turns with calls on a busy worker.
    fn next(&mut self) -> Option<(usize, Work)> {
        let first = (!self.took_background
            && self.tenants.iter().all(|q| q.background_running == 0))
        .then(|| self.next_background())
        .flatten();
        let next = first
            .or_else(|| self.next_call())
            .or_else(|| self.next_background());
        if let Some((_, work)) = &next {
            self.took_background = matches!(work, Work::Background(_));
        }
        next
    }

    fn next_call(&mut self) -> Option<(usize, Work)> {
        let n = self.tenants.len();
        for i in 0..n {
            let t = (self.turn + i) % n;
            let q = &mut self.tenants[t];
            if q.running + q.background_running < q.concurrency
                && let Some(job) = q.jobs.pop_front()
            {
                q.running += 1;
                self.turn = (t + 1) % n;
                return Some((t, Work::Call(job)));
            }
        }
        None
    }

    fn next_background(&mut self) -> Option<(usize, Work)> {
        let n = self.tenants.len();
        for i in 0..n {
            let t = (self.background_turn + i) % n;
            let q = &mut self.tenants[t];
            if q.running + q.background_running < q.concurrency
                && let Some(job) = q.background.pop_front()
            {
                q.background_running += 1;
                self.background_turn = (t + 1) % n;
                return Some((t, Work::Background(job)));
            }
        }
        None
    }

    /// How many jobs, calls or background, could start now, each tenant under its
    /// `concurrency`.
    fn startable(&self) -> usize {
        self.tenants
            .iter()
            .map(|q| {
                let free = q
                    .concurrency
                    .saturating_sub(q.running + q.background_running);
                free.min(q.jobs.len() + q.background.len())
            })
            .sum()
    }

    fn load(&self) -> (usize, usize) {
        self.tenants
            .iter()
            .fold((0, 0), |(r, w), q| (r + q.running, w + q.held - q.running))
    }

    /// Updates the running and queued gauges of `/metrics`.
    fn publish(&self) {
        let (running, queued) = self.load();
        metrics::gauge!("host_calls_running").set(running as f64);
        metrics::gauge!("host_calls_queued").set(queued as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Tenant 0 floods (concurrency 1), tenant 1 calls once: with two workers, tenant 1's
    /// call starts while tenant 0's are still queued, and tenant 0 never runs two at once.
    #[test]
    fn one_tenant_cannot_take_every_worker() {
        let pool = Pool::new(2, &[(1, 3), (1, 3)]);
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut flood = Vec::new();
        for _ in 0..4 {
            let running = running.clone();
            let ticket = pool.reserve(0).expect("a place for tenant 0");
            flood.push(ticket.run(move || {
                let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(100));
                running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                now
            }));
        }
        assert!(
            pool.reserve(0).is_none(),
            "tenant 0 is over concurrency + queue"
        );
        let started = std::time::Instant::now();
        let other = pool.reserve(1).unwrap().run(|| 7);
        assert_eq!(other.blocking_recv().unwrap(), 7);
        assert!(
            started.elapsed() < Duration::from_millis(90),
            "tenant 1 waited {:?}",
            started.elapsed()
        );
        for rx in flood {
            assert_eq!(
                rx.blocking_recv().unwrap(),
                0,
                "tenant 0 ran two calls at once"
            );
        }
        // A worker gives its place back just after the job's value is sent.
        let gave_back = std::time::Instant::now();
        while pool.load() != (0, 0) {
            assert!(
                gave_back.elapsed() < Duration::from_secs(1),
                "{:?}",
                pool.load()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Calls one at a time, with pauses between them: the worker that went idle last takes
    /// each, so they all run on one thread (warm), none on the other.
    #[test]
    fn the_worker_idle_last_takes_the_next_call() {
        let pool = Pool::new(2, &[(2, 2)]);
        let threads = threads_of_calls(&pool, 10, Duration::ZERO, Duration::from_millis(20));
        assert_eq!(threads.len(), 1, "{threads:?}");
    }

    /// The threads that ran `calls` calls of tenant 0, each taking `work`, one after
    /// another with `pause` between an answer and the next call, once the pool's workers are
    /// all waiting.
    fn threads_of_calls(
        pool: &Pool,
        calls: usize,
        work: Duration,
        pause: Duration,
    ) -> std::collections::HashSet<Option<String>> {
        std::thread::sleep(Duration::from_millis(100));
        let mut threads = std::collections::HashSet::new();
        for _ in 0..calls {
            let ran_on = pool.reserve(0).unwrap().run(move || {
                std::thread::sleep(work);
                std::thread::current().name().map(str::to_owned)
            });
            threads.insert(ran_on.blocking_recv().unwrap());
            std::thread::sleep(pause);
        }
        threads
    }

    /// Calls one after another, each queued as soon as the last is answered: while the
    /// worker that answered resets its call's memory, the next call waits for it rather than
    /// waking the idle one, so they all run on one thread; once its resets are no longer
    /// brief, the idle worker takes the next call instead.
    #[test]
    fn a_call_queued_while_the_last_worker_resets_waits_for_it_if_its_resets_are_brief() {
        fn slow_settle() {
            std::thread::sleep(Duration::from_millis(30));
        }
        for (brief, one_thread) in [
            (Duration::from_secs(1), true),
            (Duration::from_millis(1), false),
        ] {
            let pool = Pool::with_settle(2, &[(2, 2)], slow_settle, brief);
            let threads = threads_of_calls(&pool, 6, Duration::ZERO, Duration::ZERO);
            assert_eq!(
                threads.len() == 1,
                one_thread,
                "brief {brief:?}: {threads:?}"
            );
        }
    }

    /// A reset longer than `brief` but a small share of the call before it is waited for
    /// too (a slower machine's resets are longer, and so are its calls).
    #[test]
    fn a_reset_that_is_a_small_share_of_its_call_is_waited_for() {
        fn slow_settle() {
            std::thread::sleep(Duration::from_millis(30));
        }
        let pool = Pool::with_settle(2, &[(2, 2)], slow_settle, Duration::from_millis(1));
        for (work, one_thread) in [
            (Duration::from_millis(300), true),
            (Duration::from_millis(20), false),
        ] {
            let threads = threads_of_calls(&pool, 4, work, Duration::ZERO);
            assert_eq!(threads.len() == 1, one_thread, "{work:?}: {threads:?}");
        }
    }

    /// Two calls queued while one worker resets and the other is idle: one waits for the
    /// settling worker, the other starts at once on the idle one.
    #[test]
    fn only_as_many_calls_wait_as_there_are_workers_resetting() {
        fn slow_settle() {
            std::thread::sleep(Duration::from_millis(400));
        }
        let pool = Pool::with_settle(2, &[(2, 2)], slow_settle, Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(100));
        pool.reserve(0).unwrap().run(|| ()).blocking_recv().unwrap();
        let queued = Instant::now();
        let first = pool.reserve(0).unwrap().run(Instant::now);
        let second = pool.reserve(0).unwrap().run(Instant::now);
        let (first, second) = (
            first.blocking_recv().unwrap(),
            second.blocking_recv().unwrap(),
        );
        let (sooner, later) = (first.min(second) - queued, first.max(second) - queued);
        assert!(
            sooner < Duration::from_millis(200) && later >= Duration::from_millis(200),
            "started after {sooner:?} and {later:?}"
        );
    }

    /// A reset that panics ends neither its worker nor the pool: the calls after it are run.
    #[test]
    fn a_reset_that_panics_leaves_the_pool_serving() {
        fn failing_settle() {
            panic!("a reset failed (this test's)");
        }
        let pool = Pool::with_settle(2, &[(2, 2)], failing_settle, Duration::from_secs(1));
        for i in 0..4 {
            let mut answer = pool.reserve(0).unwrap().run(move || i);
            let queued = Instant::now();
            loop {
                match answer.try_recv() {
                    Ok(value) => break assert_eq!(value, i),
                    Err(oneshot::error::TryRecvError::Empty) => {
                        assert!(
                            queued.elapsed() < Duration::from_secs(5),
                            "call {i} was never run"
                        );
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(e) => panic!("call {i}: {e}"),
                }
            }
        }
    }

    /// One worker, busy with a call while an evaluation's runs and two more calls queue:
    /// background work goes first only while none runs, so the two take turns.
    #[test]
    fn calls_and_background_work_take_turns() {
        let pool = Pool::new(1, &[(1, 8)]);
        let order = Arc::new(Mutex::new(Vec::new()));
        let (open, gate) = std::sync::mpsc::channel::<()>();
        let (started, running) = std::sync::mpsc::channel::<()>();
        let busy = pool.reserve(0).unwrap().run(move || {
            started.send(()).unwrap();
            gate.recv().unwrap()
        });
        running.recv().unwrap();
        let note = |name: &'static str| {
            let order = order.clone();
            move || order.lock().unwrap().push(name)
        };
        for name in ["b1", "b2", "b3"] {
            pool.background(0, note(name));
        }
        let calls: Vec<_> = ["c1", "c2"]
            .into_iter()
            .map(|name| pool.reserve(0).unwrap().run(note(name)))
            .collect();
        open.send(()).unwrap();
        busy.blocking_recv().unwrap();
        for call in calls {
            call.blocking_recv().unwrap();
        }
        let started = std::time::Instant::now();
        while order.lock().unwrap().len() < 5 {
            assert!(started.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(*order.lock().unwrap(), ["b1", "c1", "b2", "c2", "b3"]);
    }
}
