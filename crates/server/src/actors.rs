//! Actors on worker threads: one thread and one mailbox per actor.
//!
//! Guest code runs only on the actor's own thread, never on the async reactor. The mailbox
//! is a queue: messages to one actor run one at a time in the order they arrived, while
//! different actors' threads run in parallel. A caller hands in a [`Job`] and awaits its
//! answer on a one-shot channel; what the guest emits can be streamed on a second channel as
//! it happens.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::{SystemTime, UNIX_EPOCH};

use tern_actor::{Actor, ActorModule, Reply, Runtime};
use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use crate::ApiError;

/// The stack of an actor's thread: guest calls and the host functions they make run on it.
const ACTOR_STACK_BYTES: usize = 8 << 20;

/// Where emitted bytes are streamed while one message runs.
pub type OutputStream = tokio_mpsc::UnboundedSender<Vec<u8>>;

/// Work for an actor's thread.
pub enum Job {
    /// Deliver one message; stream its `emit`s to `stream` if given.
    Message {
        body: Vec<u8>,
        stream: Option<OutputStream>,
        reply: oneshot::Sender<Result<Reply, ApiError>>,
    },
    /// Capture the actor's state as snapshot bytes.
    Snapshot {
        reply: oneshot::Sender<Result<Vec<u8>, ApiError>>,
    },
}

/// What an actor is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Idle,
    Busy,
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

/// The server's side of one actor: its mailbox and its status.
pub struct ActorHandle {
    pub id: String,
    /// The module it runs: a bundled guest's name or a digest.
    pub module: String,
    pub created_ms: u64,
    mailbox: mpsc::Sender<Job>,
    status: Arc<Mutex<Status>>,
    /// Jobs handed in and not finished.
    queued: Arc<AtomicUsize>,
    deleted: Arc<AtomicBool>,
}

impl ActorHandle {
    /// A copy of the actor's status.
    pub fn status(&self) -> Status {
        lock(&self.status).clone()
    }

    /// Jobs waiting or running.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Queues `job`; fails only when the actor's thread is gone.
    pub fn post(&self, job: Job) -> Result<(), ApiError> {
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.mailbox.send(job).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            ApiError::not_found(format!("actor `{}` has stopped", self.id))
        })
    }
}

/// Every live actor, by id.
#[derive(Default)]
pub struct Directory {
    actors: RwLock<HashMap<String, Arc<ActorHandle>>>,
    next_id: AtomicU64,
}

impl Directory {
    /// Starts an actor of `module` on a thread of its own and waits for its `tern_init`.
    pub async fn start(
        &self,
        runtime: Arc<Runtime>,
        module: Arc<ActorModule>,
        module_name: String,
    ) -> Result<Arc<ActorHandle>, ApiError> {
        let id = format!("a{}", self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let (mailbox, jobs) = mpsc::channel();
        let (started_tx, started) = oneshot::channel();
        let status = Arc::new(Mutex::new(Status {
            state: State::Busy,
            memory_bytes: 0,
            last_activity_ms: now_ms(),
        }));
        let queued = Arc::new(AtomicUsize::new(0));
        let deleted = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            status: status.clone(),
            queued: queued.clone(),
            deleted: deleted.clone(),
        };
        std::thread::Builder::new()
            .name(format!("tern-actor-{id}"))
            .stack_size(ACTOR_STACK_BYTES)
            .spawn(move || worker.run(&runtime, &module, started_tx, jobs))
            .map_err(|e| ApiError::internal(format!("cannot start the actor's thread: {e}")))?;
        started
            .await
            .map_err(|_| ApiError::internal("the actor's thread stopped while starting"))??;
        let handle = Arc::new(ActorHandle {
            id: id.clone(),
            module: module_name,
            created_ms: now_ms(),
            mailbox,
            status,
            queued,
            deleted,
        });
        write(&self.actors).insert(id, handle.clone());
        Ok(handle)
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
        all.sort_by_key(|a| (a.created_ms, a.id[1..].parse::<u64>().unwrap_or(0)));
        all
    }

    /// Removes actor `id`: jobs still queued are refused, the running one finishes, then
    /// its thread ends and its memory is freed.
    pub fn remove(&self, id: &str) -> Result<(), ApiError> {
        let handle = write(&self.actors)
            .remove(id)
            .ok_or_else(|| ApiError::not_found(format!("no actor `{id}`")))?;
        handle.deleted.store(true, Ordering::Relaxed);
        Ok(())
    }
}

/// The actor's thread.
struct Worker {
    status: Arc<Mutex<Status>>,
    queued: Arc<AtomicUsize>,
    deleted: Arc<AtomicBool>,
}

impl Worker {
    fn run(
        self,
        runtime: &Runtime,
        module: &Arc<ActorModule>,
        started: oneshot::Sender<Result<(), ApiError>>,
        jobs: mpsc::Receiver<Job>,
    ) {
        let mut actor = match Actor::start(runtime, module) {
            Ok(actor) => actor,
            Err(e) => {
                let _ = started.send(Err(e.into()));
                return;
            }
        };
        // The sink stays for the actor's life; each message puts its own stream in the slot.
        let slot: Arc<Mutex<Option<OutputStream>>> = Arc::default();
        let sink = slot.clone();
        actor.on_output(move |bytes| {
            if let Some(stream) = lock(&sink).as_ref() {
                // A closed stream is a client that left: the message runs on regardless.
                let _ = stream.send(bytes.to_vec());
            }
        });
        self.finished(&actor);
        if started.send(Ok(())).is_err() {
            return;
        }
        // Ends when the directory dropped the actor's handle and the queue is empty.
        while let Ok(job) = jobs.recv() {
            if self.deleted.load(Ordering::Relaxed) {
                refuse(job);
            } else {
                self.set_state(State::Busy);
                match job {
                    Job::Message {
                        body,
                        stream,
                        reply,
                    } => {
                        *lock(&slot) = stream;
                        let result = actor.send(&body).map_err(ApiError::from);
                        // Dropping the stream's sender ends the stream before the reply comes.
                        *lock(&slot) = None;
                        let _ = reply.send(result);
                    }
                    Job::Snapshot { reply } => {
                        let _ = reply.send(actor.snapshot().map_err(ApiError::from));
                    }
                }
                self.finished(&actor);
            }
            self.queued.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn set_state(&self, state: State) {
        let mut status = lock(&self.status);
        status.state = state;
        status.last_activity_ms = now_ms();
    }

    fn finished(&self, actor: &Actor) {
        let mut status = lock(&self.status);
        status.state = match actor.fault() {
            Some(fault) => State::Failed(fault.to_string()),
            None => State::Idle,
        };
        status.memory_bytes = actor.memory_bytes();
        status.last_activity_ms = now_ms();
    }
}

/// Answers a job queued for an actor that was deleted before it ran.
fn refuse(job: Job) {
    let gone = || ApiError::not_found("the actor was deleted before this request ran");
    match job {
        Job::Message { reply, .. } => {
            let _ = reply.send(Err(gone()));
        }
        Job::Snapshot { reply } => {
            let _ = reply.send(Err(gone()));
        }
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
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}
