//! Actors on worker threads: one thread and one mailbox per active actor.
//!
//! Guest code runs only on the actor's own thread, never on the async reactor. The mailbox
//! is a queue: messages to one actor run one at a time in the order they arrived, while
//! different actors' threads run in parallel. A caller hands in a [`Job`] and awaits its
//! answer on a one-shot channel; what the guest emits can be streamed on a second channel as
//! it happens.
//!
//! With a store ([`crate::durable`]), the thread saves the actor's snapshot after each
//! message (or only when passivating), and an actor idle past the configured time is saved
//! and passivated: its thread ends and its memory is freed. The next job restores it on a
//! fresh thread. Jobs are posted and passivation decided under one lock per actor, so no job
//! is lost between the two.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tern_actor::{Actor, ActorModule, Canceller, Reply, Runtime};
use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use crate::ApiError;
use crate::durable::{ActorRecord, Durability, Persistence};
use crate::error::STORE_UNAVAILABLE;

/// The stack of an actor's thread: guest calls and the host functions they make run on it.
const ACTOR_STACK_BYTES: usize = 8 << 20;

/// Where emitted bytes are streamed while one message runs.
pub type OutputStream = tokio_mpsc::UnboundedSender<Vec<u8>>;

/// The answer to one message: the guest's reply, and whether the state it left was saved
/// to the store before this answer.
pub struct Delivered {
    pub reply: Reply,
    pub durable: bool,
    /// A message without a stream: its output as a JSON string (lossy UTF-8), made on the
    /// actor's own thread at its lower priority, since a large reply is its tenant's work.
    pub output_json: Option<String>,
}

/// Work for an actor's thread.
pub enum Job {
    /// Deliver one message; stream its `emit`s to `stream` if given.
    Message {
        body: Vec<u8>,
        stream: Option<OutputStream>,
        reply: oneshot::Sender<Result<Delivered, ApiError>>,
    },
    /// Capture the actor's state as snapshot bytes.
    Snapshot {
        reply: oneshot::Sender<Result<Vec<u8>, ApiError>>,
    },
    /// Save and passivate now, if no other job is waiting (to make room on the host);
    /// nothing for an actor already passivated.
    Passivate,
    /// Answer once the actor is running (restored, if it was passivated).
    Ping {
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
}

/// What an actor is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Idle,
    Busy,
    /// Saved to the store with no thread or memory; the next job restores it.
    Passivated,
    /// It trapped or broke a limit, and takes no more messages: why.
    Failed(String),
}

/// What the API reports about an actor, kept current by its thread.
#[derive(Clone, Debug)]
pub struct Status {
    pub state: State,
    pub memory_bytes: usize,
    /// When it last started or finished a job, in milliseconds since the Unix epoch.
    pub last_activity_ms: u64,
}

/// Whether an actor has a thread.
enum Life {
    Active(mpsc::Sender<Job>),
    Passivated,
    /// It takes no more jobs: deleted, or its server is gone.
    Deleted,
}

/// How a new actor begins, and whether it is kept.
pub struct Birth {
    /// Its module: a bundled guest's name or a digest.
    pub module_name: String,
    /// A snapshot to start from (a fork, an upload); `None`: a fresh start with `tern_init`.
    pub snapshot: Option<Vec<u8>>,
    /// The OpenAI-compatible session it serves, kept in its record.
    pub session: Option<String>,
    /// The client that made it, kept in its record; only that client reaches it.
    pub owner: Option<String>,
    /// Never saved, passivated or recovered: a fork made for one request, or a cache entry.
    pub ephemeral: bool,
    /// Restored by another node at once when its node is lost (in a cluster).
    pub eager: bool,
}

impl Birth {
    /// A fresh actor of `module_name` that is never saved.
    pub fn ephemeral(module_name: impl Into<String>) -> Birth {
        Birth {
            ephemeral: true,
            ..Birth::fresh(module_name)
        }
    }

    /// A fresh, durable actor of `module_name`.
    pub fn fresh(module_name: impl Into<String>) -> Birth {
        Birth {
            module_name: module_name.into(),
            snapshot: None,
            session: None,
            owner: None,
            ephemeral: false,
            eager: false,
        }
    }
}

/// What an actor's thread and its handle share.
struct Shared {
    id: String,
    module_name: String,
    session: Option<String>,
    owner: Option<String>,
    eager: bool,
    created_ms: u64,
    runtime: Arc<Runtime>,
    module: Arc<ActorModule>,
    persist: Option<Arc<Persistence>>,
    life: Mutex<Life>,
    status: Mutex<Status>,
    /// Jobs handed in and not finished.
    queued: AtomicUsize,
    deleted: AtomicBool,
    /// Another instance of the actor (on another node, or a later one here) took over:
    /// jobs still queued, and any posted later, are answered "moved".
    retired: AtomicBool,
    /// Being handed to another node: the jobs queued before still run, new ones are
    /// answered "moved" (the cluster's router places them again once it is released).
    leaving: AtomicBool,
    /// Stops the running actor when it is deleted (set once its thread has it).
    stopper: Mutex<Option<Canceller>>,
    /// The server's count of actors with a thread.
    resident: Arc<AtomicUsize>,
    /// The most jobs that may wait for this actor.
    max_queued: usize,
}

impl Shared {
    /// What the store keeps beside the actor's snapshot; `failed`: why it failed, if it has.
    fn record(&self, failed: Option<String>) -> ActorRecord {
        ActorRecord {
            module: self.module_name.clone(),
            created_ms: self.created_ms,
            session: self.session.clone(),
            owner: self.owner.clone(),
            failed,
            eager: self.eager,
        }
    }
}

/// The server's side of one actor: its mailbox and its status.
pub struct ActorHandle {
    pub id: String,
    /// The module it runs: a bundled guest's name or a digest.
    pub module: String,
    /// The OpenAI-compatible session it serves.
    pub session: Option<String>,
    /// The client that made it.
    pub owner: Option<String>,
    /// Whether it is saved to the store (and so survives passivation and restarts).
    pub durable: bool,
    pub created_ms: u64,
    shared: Arc<Shared>,
}

impl ActorHandle {
    fn of(shared: Arc<Shared>) -> Arc<ActorHandle> {
        Arc::new(ActorHandle {
            id: shared.id.clone(),
            module: shared.module_name.clone(),
            session: shared.session.clone(),
            owner: shared.owner.clone(),
            durable: shared.persist.is_some(),
            created_ms: shared.created_ms,
            shared,
        })
    }

    /// A copy of the actor's status.
    pub fn status(&self) -> Status {
        lock(&self.shared.status).clone()
    }

    /// The compiled module it runs.
    pub fn module_handle(&self) -> Arc<ActorModule> {
        self.shared.module.clone()
    }

    /// Jobs waiting or running.
    pub fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Whether it has a thread and memory (it is not passivated).
    pub fn is_resident(&self) -> bool {
        matches!(*lock(&self.shared.life), Life::Active(_))
    }

    /// Whether it is being handed to another node.
    pub fn leaving(&self) -> bool {
        self.shared.leaving.load(Ordering::Relaxed)
    }

    /// Starts (`true`) or ends a hand-over to another node: from now on, jobs other than
    /// [`Job::Passivate`] are answered "moved" until it ends.
    pub fn set_leaving(&self, on: bool) {
        // Under the lock that `post` holds: no job slips in after this returns.
        let _life = lock(&self.shared.life);
        self.shared.leaving.store(on, Ordering::Relaxed);
    }

    /// Queues `job`, restoring a passivated actor on a fresh thread first; fails when the
    /// actor was deleted or its thread is gone, (429) when its queue is full, or ("moved")
    /// when it runs elsewhere now or is being handed over. An instance that was replaced
    /// is never restored again: that would take the actor back from its new owner.
    pub fn post(&self, job: Job) -> Result<(), ApiError> {
        let shared = &self.shared;
        let mut life = lock(&shared.life);
        let passivate = matches!(job, Job::Passivate);
        if !passivate
            && (shared.retired.load(Ordering::Relaxed) || shared.leaving.load(Ordering::Relaxed))
        {
            return Err(ApiError::moved(format!(
                "actor `{}` is moving to another node; send the request again",
                self.id
            )));
        }
        if shared.queued.load(Ordering::Relaxed) >= shared.max_queued {
            return Err(ApiError::busy(
                format!(
                    "actor `{}` has {} requests waiting already",
                    self.id, shared.max_queued
                ),
                1,
            ));
        }
        if let Life::Passivated = *life {
            if passivate {
                return Ok(());
            }
            let (mailbox, jobs) = mpsc::channel();
            spawn(shared.clone(), Boot::Restore, jobs)?;
            *life = Life::Active(mailbox);
        }
        let Life::Active(mailbox) = &*life else {
            return Err(ApiError::not_found(format!("no actor `{}`", self.id)));
        };
        shared.queued.fetch_add(1, Ordering::Relaxed);
        mailbox.send(job).map_err(|_| {
            shared.queued.fetch_sub(1, Ordering::Relaxed);
            ApiError::not_found(format!("actor `{}` has stopped", self.id))
        })
    }
}

impl Drop for ActorHandle {
    // The thread holds the shared part, mailbox included: dropping the last handle (the
    // server stopped) closes the mailbox so the thread ends. The stored state stays.
    fn drop(&mut self) {
        *lock(&self.shared.life) = Life::Deleted;
    }
}

/// Every actor, by id.
pub struct Directory {
    actors: RwLock<HashMap<String, Arc<ActorHandle>>>,
    persist: Option<Arc<Persistence>>,
    /// Actors with a thread (started, restored, not yet passivated or ended).
    resident: Arc<AtomicUsize>,
    /// The most jobs that may wait for one actor.
    max_queued: usize,
}

impl Directory {
    pub fn new(persist: Option<Arc<Persistence>>, max_queued: usize) -> Directory {
        Directory {
            actors: RwLock::default(),
            persist,
            resident: Arc::default(),
            max_queued,
        }
    }

    /// How many actors have a thread now.
    pub fn resident(&self) -> usize {
        self.resident.load(Ordering::Relaxed)
    }

    /// Asks the least recently used idle, durable actor (other than `except`) to passivate;
    /// says whether there was one. A busy actor, or one with jobs waiting, is never chosen.
    pub fn passivate_lru(&self, except: Option<&str>) -> bool {
        let mut idle: Vec<(u64, Arc<ActorHandle>)> = read(&self.actors)
            .values()
            .filter(|a| {
                a.durable && a.queued() == 0 && Some(a.id.as_str()) != except && a.is_resident()
            })
            .filter_map(|a| {
                let status = a.status();
                (status.state == State::Idle).then(|| (status.last_activity_ms, a.clone()))
            })
            .collect();
        idle.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));
        idle.into_iter()
            .any(|(_, actor)| actor.post(Job::Passivate).is_ok())
    }

    /// Starts an actor of `module` on a thread of its own and waits for its `tern_init` or
    /// its restore (and, when durable, for its first save).
    pub async fn start(
        &self,
        runtime: Arc<Runtime>,
        module: Arc<ActorModule>,
        birth: Birth,
    ) -> Result<Arc<ActorHandle>, ApiError> {
        let id = fresh_id()?;
        let (mailbox, jobs) = mpsc::channel();
        let (started_tx, started) = oneshot::channel();
        let mut shared = self.shared(
            id,
            birth.module_name,
            now_ms(),
            runtime,
            module,
            State::Busy,
        );
        let shared_mut = Arc::get_mut(&mut shared).expect("not shared yet");
        shared_mut.session = birth.session;
        shared_mut.owner = birth.owner;
        shared_mut.eager = birth.eager;
        if birth.ephemeral {
            shared_mut.persist = None;
        }
        *lock(&shared.life) = Life::Active(mailbox);
        spawn(
            shared.clone(),
            Boot::Start(started_tx, birth.snapshot),
            jobs,
        )?;
        started
            .await
            .map_err(|_| ApiError::internal("the actor's thread stopped while starting"))??;
        Ok(self.insert(shared))
    }

    /// Lists an actor brought back from the store, passivated: its first job restores it.
    pub fn recover(
        &self,
        runtime: Arc<Runtime>,
        module: Arc<ActorModule>,
        record: &ActorRecord,
        id: String,
    ) {
        let mut shared = self.shared(
            id,
            record.module.clone(),
            record.created_ms,
            runtime,
            module,
            State::Passivated,
        );
        let shared_mut = Arc::get_mut(&mut shared).expect("not shared yet");
        shared_mut.session = record.session.clone();
        shared_mut.owner = record.owner.clone();
        shared_mut.eager = record.eager;
        if let Some(fault) = &record.failed {
            lock(&shared.status).state = State::Failed(fault.clone());
        }
        // Two requests may adopt the same actor at once: the first handle stays, so that
        // one node never runs two instances of it.
        let handle = ActorHandle::of(shared);
        write(&self.actors)
            .entry(handle.id.clone())
            .or_insert(handle);
    }

    fn shared(
        &self,
        id: String,
        module_name: String,
        created_ms: u64,
        runtime: Arc<Runtime>,
        module: Arc<ActorModule>,
        state: State,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            id,
            module_name,
            session: None,
            owner: None,
            eager: false,
            created_ms,
            runtime,
            module,
            persist: self.persist.clone(),
            life: Mutex::new(Life::Passivated),
            status: Mutex::new(Status {
                state,
                memory_bytes: 0,
                last_activity_ms: now_ms(),
            }),
            queued: AtomicUsize::new(0),
            deleted: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            resident: self.resident.clone(),
            max_queued: self.max_queued,
            stopper: Mutex::new(None),
        })
    }

    fn insert(&self, shared: Arc<Shared>) -> Arc<ActorHandle> {
        let handle = ActorHandle::of(shared);
        write(&self.actors).insert(handle.id.clone(), handle.clone());
        handle
    }

    /// The actor `id`.
    pub fn get(&self, id: &str) -> Result<Arc<ActorHandle>, ApiError> {
        read(&self.actors)
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no actor `{id}`")))
    }

    /// Every actor, oldest first.
    pub fn list(&self) -> Vec<Arc<ActorHandle>> {
        let mut all: Vec<_> = read(&self.actors).values().cloned().collect();
        all.sort_by(|a, b| (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id)));
        all
    }

    /// Forgets actor `id` here without touching its stored state, because another instance
    /// of it runs elsewhere (or is about to, here): jobs still queued are answered "moved",
    /// the running one finishes, then its thread ends.
    pub fn evict(&self, id: &str) {
        let removed = write(&self.actors).remove(id);
        if let Some(handle) = removed {
            // Under the lock that `post` holds: no job restores it after this returns.
            let _life = lock(&handle.shared.life);
            handle.shared.retired.store(true, Ordering::Relaxed);
        }
    }

    /// Removes actor `id`: jobs still queued are refused, the running one finishes, then
    /// its thread ends, its memory is freed and its state leaves the store.
    pub fn remove(&self, id: &str) -> Result<(), ApiError> {
        let handle = write(&self.actors)
            .remove(id)
            .ok_or_else(|| ApiError::not_found(format!("no actor `{id}`")))?;
        let shared = &handle.shared;
        shared.deleted.store(true, Ordering::Relaxed);
        // A guest still running (even in a loop that never calls the host) ends now, not
        // at its time limit.
        if let Some(stopper) = lock(&shared.stopper).as_ref() {
            stopper.stop();
        }
        let was = std::mem::replace(&mut *lock(&shared.life), Life::Deleted);
        // An active thread forgets the stored state itself once its last job is done, so
        // that a save still running cannot bring it back.
        if let (Life::Passivated, Some(persist)) = (was, &shared.persist) {
            persist.forget(id);
        }
        Ok(())
    }
}

/// How a thread gets its actor.
enum Boot {
    /// Run `tern_init` (or restore the snapshot given), then say so.
    Start(oneshot::Sender<Result<(), ApiError>>, Option<Vec<u8>>),
    /// Restore the last stored snapshot.
    Restore,
}

fn spawn(shared: Arc<Shared>, boot: Boot, jobs: mpsc::Receiver<Job>) -> Result<(), ApiError> {
    let resident = shared.resident.clone();
    resident.fetch_add(1, Ordering::Relaxed);
    std::thread::Builder::new()
        .name(format!("tern-actor-{}", shared.id))
        .stack_size(ACTOR_STACK_BYTES)
        .spawn(move || {
            let resident = shared.resident.clone();
            let saved_at = Cell::new(Instant::now());
            Worker { shared, saved_at }.run(boot, jobs);
            resident.fetch_sub(1, Ordering::Relaxed);
        })
        .map(|_| ())
        .map_err(|e| {
            resident.fetch_sub(1, Ordering::Relaxed);
            ApiError::internal(format!("cannot start the actor's thread: {e}"))
        })
}

/// The actor's thread.
struct Worker {
    shared: Arc<Shared>,
    /// When the actor's state was last saved (or the thread started).
    saved_at: Cell<Instant>,
}

/// What the mailbox gave after a wait.
enum Next {
    Job(Job),
    /// Idle past the limit and saved: the thread ends.
    Passivated,
    /// The handle is gone (deleted, or the server stopped).
    Closed,
}

impl Worker {
    fn run(self, boot: Boot, jobs: mpsc::Receiver<Job>) {
        static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        crate::store::set_writer(INSTANCES.fetch_add(1, Ordering::Relaxed));
        let Some(mut actor) = self.boot(boot, &jobs) else {
            return;
        };
        // The sink stays for the actor's life; each message puts its own stream in the slot.
        let slot: Arc<Mutex<Option<OutputStream>>> = Arc::default();
        let sink = slot.clone();
        let canceller = actor.canceller();
        *lock(&self.shared.stopper) = Some(canceller.clone());
        if self.shared.deleted.load(Ordering::Relaxed) {
            canceller.stop();
        }
        actor.on_output(move |bytes| {
            if let Some(stream) = lock(&sink).as_ref()
                && stream.send(bytes.to_vec()).is_err()
            {
                // A closed stream is a client that left: the message is cancelled, and the
                // guest's next emit or forward pass returns the ABI's "cancelled" code.
                canceller.cancel();
            }
        });
        // Whether the actor's state differs from the stored one.
        let mut dirty = false;
        loop {
            let job = match self.next(&jobs, &mut actor, &mut dirty) {
                Next::Job(job) => job,
                Next::Passivated => {
                    tracing::info!(id = %self.shared.id, "actor passivated");
                    return;
                }
                Next::Closed => break,
            };
            if let Job::Passivate = job {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                if self.passivate(&mut actor, &mut dirty) {
                    tracing::info!(id = %self.shared.id, "actor passivated to make room");
                    return;
                }
                continue;
            }
            if self.shared.deleted.load(Ordering::Relaxed) {
                refuse(job);
            } else if self.shared.retired.load(Ordering::Relaxed) {
                fail(
                    job,
                    &ApiError::moved("the actor moved; send the request again"),
                );
            } else {
                self.set_state(State::Busy);
                if !self.handle(job, &mut actor, &slot, &mut dirty) {
                    self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                    self.go_passive(&jobs);
                    break;
                }
            }
            self.shared.queued.fetch_sub(1, Ordering::Relaxed);
        }
        if let (true, Some(persist)) = (
            self.shared.deleted.load(Ordering::Relaxed),
            &self.shared.persist,
        ) {
            persist.forget(&self.shared.id);
        }
    }

    /// The actor, started or restored; `None` (the error sent or recorded) if that failed.
    fn boot(&self, boot: Boot, jobs: &mpsc::Receiver<Job>) -> Option<Actor> {
        let shared = &self.shared;
        match boot {
            Boot::Start(started, snapshot) => {
                let result = match &snapshot {
                    None => Actor::start(&shared.runtime, &shared.module).map_err(ApiError::from),
                    Some(bytes) => restore_bytes(&shared.runtime, &shared.module, bytes),
                };
                let result = result.and_then(|mut actor| {
                    if let Some(persist) = &shared.persist {
                        persist.record(&shared.id, &shared.record(None))?;
                        persist.save(&shared.id, &mut actor)?;
                    }
                    Ok(actor)
                });
                self.finished_or(&result);
                match result {
                    Ok(actor) => {
                        self.finished(&actor);
                        if started.send(Ok(())).is_ok() {
                            return Some(actor);
                        }
                        // The request that started it is gone, so nobody knows its id.
                        if let Some(persist) = &shared.persist {
                            persist.forget(&shared.id);
                        }
                        None
                    }
                    Err(e) => {
                        let _ = started.send(Err(e));
                        None
                    }
                }
            }
            Boot::Restore => {
                let result = match &shared.persist {
                    Some(persist) => persist.restore(&shared.id, &shared.runtime, &shared.module),
                    None => Err(ApiError::internal("no store to restore the actor from")),
                };
                self.finished_or(&result);
                match result {
                    Ok(actor) => {
                        self.finished(&actor);
                        Some(actor)
                    }
                    Err(e) if e.kind == crate::error::MOVED || e.kind == STORE_UNAVAILABLE => {
                        // Another node has it, or the store is out of reach for now: the
                        // handle goes back to passivated, so a later job tries again.
                        tracing::info!(id = %shared.id, error = %e.message, "not restored now");
                        self.go_passive(jobs);
                        None
                    }
                    Err(e) => {
                        tracing::error!(id = %shared.id, error = %e.message, "restore failed");
                        // Every job until the handle goes answers the failure.
                        while let Ok(job) = jobs.recv() {
                            fail(job, &e);
                            shared.queued.fetch_sub(1, Ordering::Relaxed);
                        }
                        None
                    }
                }
            }
        }
    }

    /// Waits for the next job. Meanwhile, with durability per interval, saves unsaved state
    /// when its interval is up; past the idle limit, saves and passivates the actor unless a
    /// job came in the meantime.
    fn next(&self, jobs: &mpsc::Receiver<Job>, actor: &mut Actor, dirty: &mut bool) -> Next {
        let shared = &self.shared;
        let Some(persist) = &shared.persist else {
            return jobs.recv().map_or(Next::Closed, Next::Job);
        };
        let interval = match persist.durability {
            Durability::Interval(every) => Some(every),
            _ => None,
        };
        let passivate_at = persist.idle.map(|idle| Instant::now() + idle);
        loop {
            let save_at = interval
                .filter(|_| *dirty)
                .map(|every| self.saved_at.get() + every);
            let wake = save_at.into_iter().chain(passivate_at).min();
            let Some(wake) = wake else {
                return jobs.recv().map_or(Next::Closed, Next::Job);
            };
            match jobs.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Ok(job) => return Next::Job(job),
                Err(mpsc::RecvTimeoutError::Disconnected) => return Next::Closed,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if shared.queued.load(Ordering::Relaxed) > 0 {
                continue; // A job was posted after the wait ended: run it first.
            }
            let now = Instant::now();
            if save_at.is_some_and(|at| at <= now) && actor.fault().is_none() {
                self.save(actor, dirty);
            }
            if passivate_at.is_some_and(|at| at <= now) && self.passivate(actor, dirty) {
                return Next::Passivated;
            }
        }
    }

    /// Drops the actor's state in memory, which is ahead of its last durable snapshot (a
    /// save failed) or was never brought back: the handle goes back to passivated, so its
    /// next job restores the last durable state, and the jobs already queued here are
    /// answered "moved" (the cluster's router sends them again; a client may too).
    fn go_passive(&self, jobs: &mpsc::Receiver<Job>) {
        let shared = &self.shared;
        {
            let mut life = lock(&shared.life);
            if matches!(*life, Life::Active(_)) {
                *life = Life::Passivated;
            }
        }
        {
            let mut status = lock(&shared.status);
            status.state = State::Passivated;
            status.memory_bytes = 0;
        }
        let again = ApiError::moved("the actor went back to its last durable state; send again");
        while let Ok(job) = jobs.try_recv() {
            fail(job, &again);
            shared.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Saves the actor's state to the store; says whether it did (a failure is logged).
    fn save(&self, actor: &mut Actor, dirty: &mut bool) -> bool {
        let Some(persist) = &self.shared.persist else {
            return false;
        };
        match persist.save(&self.shared.id, actor) {
            Ok(()) => {
                *dirty = false;
                self.saved_at.set(Instant::now());
                true
            }
            Err(e) => {
                tracing::error!(id = %self.shared.id, error = %e.message, "save failed");
                false
            }
        }
    }

    /// Saves the actor if needed and marks it passivated, unless it failed, a save fails,
    /// a job is waiting or it was deleted; says whether it did (the thread then ends).
    fn passivate(&self, actor: &mut Actor, dirty: &mut bool) -> bool {
        let shared = &self.shared;
        if shared.persist.is_none() || actor.fault().is_some() {
            return false; // A failed actor stays, to answer its fault.
        }
        if *dirty && !self.save(actor, dirty) {
            return false;
        }
        // Under the lock no job can be posted: the mailbox is empty or it is not.
        let mut life = lock(&shared.life);
        if shared.queued.load(Ordering::Relaxed) > 0 || !matches!(*life, Life::Active(_)) {
            return false;
        }
        *life = Life::Passivated;
        // Still under the lock: a job posted from now on restores the actor, and so takes
        // it back first if the store shares it.
        if let Some(persist) = &shared.persist
            && let Err(e) = persist.release(&shared.id)
        {
            tracing::warn!(id = %shared.id, error = %e.message, "cannot release the actor");
        }
        let mut status = lock(&shared.status);
        status.state = State::Passivated;
        status.memory_bytes = 0;
        true
    }

    /// Runs one job; says whether the actor's state in memory stays (not when a message's
    /// state had to be saved before its answer and could not be).
    fn handle(
        &self,
        job: Job,
        actor: &mut Actor,
        slot: &Mutex<Option<OutputStream>>,
        dirty: &mut bool,
    ) -> bool {
        match job {
            Job::Message {
                body,
                stream,
                reply,
            } => {
                let streamed = stream.is_some();
                *lock(slot) = stream;
                let result = actor.send(&body).map_err(ApiError::from);
                if result.is_err() {
                    self.record_fault(actor);
                }
                // Dropping the stream's sender ends the stream before the reply comes.
                *lock(slot) = None;
                let mut keep = true;
                let result = result.and_then(|reply| match self.after_message(actor, dirty) {
                    Ok(durable) => Ok(Delivered {
                        durable,
                        output_json: (!streamed).then(|| {
                            Value::String(String::from_utf8_lossy(&reply.output).into_owned())
                                .to_string()
                        }),
                        reply,
                    }),
                    Err(e) => {
                        keep = false;
                        tracing::error!(id = %self.shared.id, error = %e.message, "save failed");
                        Err(ApiError {
                            message: format!(
                                "the message ran but its state could not be saved ({}); the \
                                 actor is back at its last durable state",
                                e.message
                            ),
                            ..e
                        })
                    }
                });
                // The status is current before the client hears the answer.
                self.finished(actor);
                let _ = reply.send(result);
                return keep;
            }
            Job::Snapshot { reply } => {
                let result = actor.snapshot().map_err(ApiError::from);
                self.finished(actor);
                let _ = reply.send(result);
            }
            Job::Ping { reply } => {
                self.finished(actor);
                let _ = reply.send(Ok(()));
            }
            // Taken by the loop before it gets here.
            Job::Passivate => {}
        }
        true
    }

    /// Records in the store that the actor failed, so that a restart keeps it failed rather
    /// than bringing back its last good state.
    fn record_fault(&self, actor: &Actor) {
        let (Some(fault), Some(persist)) = (actor.fault(), &self.shared.persist) else {
            return;
        };
        let shared = &self.shared;
        let record = shared.record(Some(fault.to_string()));
        if let Err(e) = persist.record(&shared.id, &record) {
            tracing::error!(id = %shared.id, error = %e.message, "cannot record the fault");
        }
    }

    /// Saves after a message when durability is per message (a failure is the message's
    /// error), or per interval and the interval is up (a failure is logged, and the save
    /// retried when the actor waits); says whether it was saved.
    fn after_message(&self, actor: &mut Actor, dirty: &mut bool) -> Result<bool, ApiError> {
        let Some(persist) = &self.shared.persist else {
            return Ok(false);
        };
        *dirty = true;
        match persist.durability {
            Durability::Message => {
                persist.save(&self.shared.id, actor)?;
                *dirty = false;
                self.saved_at.set(Instant::now());
                Ok(true)
            }
            Durability::Interval(every) => {
                Ok(self.saved_at.get().elapsed() >= every && self.save(actor, dirty))
            }
            Durability::Passivate => Ok(false),
        }
    }

    fn set_state(&self, state: State) {
        let mut status = lock(&self.shared.status);
        status.state = state;
        status.last_activity_ms = now_ms();
    }

    fn finished_or<T>(&self, result: &Result<T, ApiError>) {
        if let Err(e) = result {
            self.set_state(State::Failed(e.message.clone()));
        }
    }

    fn finished(&self, actor: &Actor) {
        let mut status = lock(&self.shared.status);
        status.state = match actor.fault() {
            Some(fault) => State::Failed(fault.to_string()),
            None => State::Idle,
        };
        status.memory_bytes = actor.memory_bytes();
        status.last_activity_ms = now_ms();
    }
}

/// A new actor of `module` from snapshot `bytes`, checked by the same parser and
/// compatibility rules as a snapshot file.
fn restore_bytes(
    runtime: &Runtime,
    module: &Arc<ActorModule>,
    bytes: &[u8],
) -> Result<Actor, ApiError> {
    let view = tern_snapshot::parse(bytes)
        .map_err(|e| ApiError::bad_request(format!("the snapshot is unreadable: {e}")))?;
    let mut actor = Actor::restore(runtime, module, &view).map_err(|e| match e {
        tern_actor::ActorError::Snapshot(_) => ApiError::bad_request(e.to_string()),
        e => ApiError::from(e),
    })?;
    // Its chain starts in this server's store.
    actor.restart_chain();
    Ok(actor)
}

/// Answers a job queued for an actor that was deleted before it ran.
fn refuse(job: Job) {
    fail(
        job,
        &ApiError::not_found("the actor was deleted before this request ran"),
    );
}

fn fail(job: Job, e: &ApiError) {
    match job {
        Job::Message { reply, .. } => {
            let _ = reply.send(Err(e.clone()));
        }
        Job::Snapshot { reply } => {
            let _ = reply.send(Err(e.clone()));
        }
        Job::Ping { reply } => {
            let _ = reply.send(Err(e.clone()));
        }
        Job::Passivate => {}
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

// A panic while a lock was held leaves data that is still consistent here (plain values
// replaced whole), so a poisoned lock is used as it is rather than spreading the panic.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// A new actor id: `a` and 32 hex digits from the operating system's random source, so that
/// knowing one actor's id tells nothing about another's.
fn fresh_id() -> Result<String, ApiError> {
    Ok(format!("a{}", random_hex(16)?))
}

/// `N` bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], ApiError> {
    use std::io::Read;
    let mut bytes = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| ApiError::internal(format!("reading /dev/urandom: {e}")))?;
    Ok(bytes)
}

/// `2 * bytes` hex digits from the operating system's random source.
pub fn random_hex(bytes: usize) -> Result<String, ApiError> {
    let mut out = String::with_capacity(2 * bytes);
    for _ in 0..bytes.div_ceil(16) {
        for b in random_bytes::<16>()? {
            out.push_str(&format!("{b:02x}"));
        }
    }
    out.truncate(2 * bytes);
    Ok(out)
}
