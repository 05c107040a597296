//! The slots for task processes: at most `max_concurrent` tries hold one,
//! and a freed slot goes to the try that has waited longest for one.
//!
//! A try waits for its slot last, with its start ready (its recipe, its
//! cgroup): it leaves that start in the line ("armed"). When a task process
//! exits, the spawner thread that started it sees the exit (its pidfd is in
//! their epoll) and hands the slot on here at once: if the next try in line
//! is armed, that thread starts it right there and sends it the process. The
//! exit costs no wake-up of the runtime's thread, no poll of a task, no
//! hand-off between threads before the next `clone` (measured at
//! `max_concurrent` 1: 0.29 ms from an exit to the next fork, against 0.17
//! for a loop that only spawns).
//!
//! Everything else that frees a slot (the runtime's sight of the exit when it
//! came first, a try that never started, a start that failed, a preloaded
//! try's end, a reload that raised `max_concurrent`) goes through the same
//! [`Slots`] under the same lock, so that a slot is handed over exactly once:
//! each try's [`Place`] says whether it waits, is being started, or holds a
//! slot, and only a held slot is released, once.
//!
//! A preloaded try is not armed: its start is a message to its program's
//! preloaded parent, which the runtime sends; the slot handed to it wakes it.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

use super::spawner::{Child, Exec, Handover, Line, Recipe, Started};

/// The slots and the line of tries waiting for one (one per scheduler).
pub(crate) struct Slots {
    state: Mutex<State>,
    /// Where a start handed over by the runtime's side is made.
    exec: Exec,
}

struct State {
    /// The limit in force (the latest `join` or `fill` says it).
    max_concurrent: usize,
    /// Slots held: by tries being started, running, or ended and not released yet.
    held: usize,
    /// The places waiting for a slot, in claim order.
    line: VecDeque<u64>,
    /// Every try's place, from its `join` until its slot is released (or it
    /// leaves the line without one).
    places: HashMap<u64, Place>,
}

/// Where a try stands.
enum Place {
    /// In line, its start not ready yet (or preloaded): told with `Handed::Slot`.
    Waiting(oneshot::Sender<Handed>),
    /// In line with its start ready: the next slot freed starts it.
    Armed(oneshot::Sender<Handed>, Box<Recipe>),
    /// It has a slot, and a spawner thread is starting its process; the
    /// process (or why it did not start) goes to the sender.
    Starting(oneshot::Sender<Handed>),
    /// It holds a slot.
    Holding,
    /// Its try was dropped while its start was being made: the spawner thread
    /// kills what it started and releases the slot.
    Abandoned,
}

/// What the line sends a waiting try.
enum Handed {
    /// A slot: the try starts itself (a preloaded try, or one whose start
    /// was not ready when the slot came).
    Slot,
    /// Its armed start, made on a spawner thread with the slot handed to it.
    Started(io::Result<Started>),
}

/// Who gets a freed slot.
enum Next {
    /// Nobody waits.
    Nobody,
    /// A try not armed, now told.
    Told,
    /// An armed try, whose start is to be made.
    Start(Handover),
}

/// Unique across every `Slots` of the process (the spawner threads' keys).
static PLACES: AtomicU64 = AtomicU64::new(1);

impl Slots {
    pub(super) fn new(exec: Exec) -> Arc<Slots> {
        Arc::new(Slots {
            state: Mutex::new(State {
                max_concurrent: 0,
                held: 0,
                line: VecDeque::new(),
                places: HashMap::new(),
            }),
            exec,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A newly claimed try: it holds a slot at once if one is free, else it
    /// waits in line.
    pub(crate) fn join(self: &Arc<Self>, max_concurrent: usize) -> Ticket {
        let place = PLACES.fetch_add(1, Ordering::Relaxed);
        let (tell, handed) = oneshot::channel();
        let mut state = self.state();
        state.max_concurrent = max_concurrent;
        if state.held < max_concurrent {
            state.held += 1;
            state.places.insert(place, Place::Holding);
        } else {
            state.line.push_back(place);
            state.places.insert(place, Place::Waiting(tell));
        }
        Ticket {
            slots: self.clone(),
            place,
            handed,
        }
    }

    /// A ticket that never gets a slot: its try is withdrawn at once and
    /// given back, not counted, as the tries waiting at a shutdown are (rows
    /// a claim returned after the daemon was told to stop).
    pub(crate) fn withdrawn(self: &Arc<Self>) -> Ticket {
        let (_, handed) = oneshot::channel();
        Ticket {
            slots: self.clone(),
            place: PLACES.fetch_add(1, Ordering::Relaxed),
            handed,
        }
    }

    /// Gives free slots to waiting tries (there may be more slots after a
    /// reload); returns how many are held and how many tries wait.
    pub(crate) fn fill(self: &Arc<Self>, max_concurrent: usize) -> (usize, usize) {
        let mut starts = Vec::new();
        let counts = {
            let mut state = self.state();
            state.max_concurrent = max_concurrent;
            while state.held < max_concurrent {
                match self.next(&mut state) {
                    Next::Nobody => break,
                    Next::Told => state.held += 1,
                    Next::Start(handover) => {
                        state.held += 1;
                        starts.push(handover);
                    }
                }
            }
            (state.held, state.line.len())
        };
        for handover in starts {
            self.exec.hand_over(handover);
        }
        counts
    }

    /// Every waiting try is told to give its row back (a shutdown): its
    /// start, armed or not, is never made.
    pub(crate) fn close(&self) {
        let mut state = self.state();
        let State { line, places, .. } = &mut *state;
        for place in line.drain(..) {
            // Dropping its sender tells the try.
            places.remove(&place);
        }
    }

    /// Takes the next try in line and gives it the slot being handed on.
    fn next(self: &Arc<Self>, state: &mut State) -> Next {
        while let Some(place) = state.line.pop_front() {
            match state.places.remove(&place) {
                Some(Place::Waiting(tell)) => {
                    // Its receiver is alive: a ticket leaves `places` before
                    // it is dropped.
                    let _ = tell.send(Handed::Slot);
                    state.places.insert(place, Place::Holding);
                    return Next::Told;
                }
                Some(Place::Armed(tell, recipe)) => {
                    state.places.insert(place, Place::Starting(tell));
                    return Next::Start(Handover {
                        line: self.clone(),
                        place,
                        recipe,
                    });
                }
                Some(other) => {
                    state.places.insert(place, other);
                }
                None => {}
            }
        }
        Next::Nobody
    }

    /// Releases the slot `place` holds, once: the next try in line gets it.
    /// Returns the start to make if that try is armed. A place that holds no
    /// slot (already released, or still waiting or starting) is left alone.
    pub(super) fn release(self: &Arc<Self>, place: u64) -> Option<Handover> {
        let mut state = self.state();
        match state.places.remove(&place) {
            Some(Place::Holding | Place::Abandoned) => {}
            Some(other) => {
                state.places.insert(place, other);
                return None;
            }
            None => return None,
        }
        if state.held <= state.max_concurrent {
            match self.next(&mut state) {
                Next::Nobody => {}
                Next::Told => return None,
                Next::Start(handover) => return Some(handover),
            }
        }
        state.held = state.held.saturating_sub(1);
        None
    }

    /// [`Slots::release`] from the runtime's side: an armed start it hands
    /// over goes to a spawner thread.
    fn release_and_hand_over(self: &Arc<Self>, place: u64) {
        if let Some(handover) = self.release(place) {
            self.exec.hand_over(handover);
        }
    }

    /// Gives `place` the start made for it. `Err` gives the start back when
    /// nobody will take it (its try is gone): the caller undoes it and
    /// releases the slot.
    pub(super) fn deliver(
        &self,
        place: u64,
        started: io::Result<Started>,
    ) -> Result<(), io::Result<Started>> {
        let mut state = self.state();
        match state.places.remove(&place) {
            Some(Place::Starting(tell)) => {
                state.places.insert(place, Place::Holding);
                match tell.send(Handed::Started(started)) {
                    Ok(()) => Ok(()),
                    Err(Handed::Started(started)) => Err(started),
                    Err(Handed::Slot) => unreachable!("the message just sent"),
                }
            }
            Some(other) => {
                state.places.insert(place, other);
                Err(started)
            }
            None => Err(started),
        }
    }

    #[cfg(test)]
    fn counts(&self) -> (usize, usize) {
        let state = self.state();
        (state.held, state.line.len())
    }

    #[cfg(test)]
    fn is_armed(&self, place: u64) -> bool {
        matches!(self.state().places.get(&place), Some(Place::Armed(..)))
    }
}

/// The spawner threads' side of the line: a watched process's exit frees
/// its slot, and a start made on a spawner thread is delivered.
impl Line for Slots {
    fn slot_freed(self: Arc<Self>, place: u64) -> Option<Handover> {
        self.release(place)
    }

    fn deliver_start(
        &self,
        place: u64,
        started: io::Result<Started>,
    ) -> Result<(), io::Result<Started>> {
        self.deliver(place, started)
    }
}

/// A try's place in [`Slots`], then its slot; dropping it leaves the line
/// or releases the slot.
pub(crate) struct Ticket {
    slots: Arc<Slots>,
    place: u64,
    handed: oneshot::Receiver<Handed>,
}

/// How a try's wait in line ended.
pub(crate) enum Turn {
    /// Its process, started with the slot (`waited`: handed to it in line,
    /// on a spawner thread, rather than asked for with a slot already held).
    Started {
        child: io::Result<Child>,
        waited: bool,
    },
    /// The slot, for a start the caller makes (a preloaded try).
    Slot(Recipe),
    /// It stopped waiting before it had a slot, or the line was closed.
    Withdrawn,
}

impl Ticket {
    /// Waits for the slot with `recipe` ready, and starts it. `give_up`
    /// resolving means the try must stop waiting: it leaves the line unless
    /// its start was already handed to a spawner thread, in which case it
    /// goes on as a started try (the caller stops it as a running one).
    pub(crate) async fn start(
        &mut self,
        recipe: Recipe,
        give_up: impl std::future::Future<Output = ()>,
    ) -> Turn {
        let armable = !recipe.preload;
        let mut recipe = Some(recipe);
        let mut waited = true;
        let submit = {
            let mut state = self.slots.state();
            match state.places.remove(&self.place) {
                Some(Place::Waiting(tell)) if armable => {
                    let recipe = Box::new(recipe.take().expect("not yet handed"));
                    state.places.insert(self.place, Place::Armed(tell, recipe));
                    None
                }
                Some(Place::Holding) if armable => {
                    // Its slot came before its start was ready: started now.
                    waited = false;
                    let (tell, handed) = oneshot::channel();
                    self.handed = handed;
                    state.places.insert(self.place, Place::Starting(tell));
                    Some(Handover {
                        line: self.slots.clone(),
                        place: self.place,
                        recipe: Box::new(recipe.take().expect("not yet handed")),
                    })
                }
                Some(Place::Holding) => {
                    state.places.insert(self.place, Place::Holding);
                    return Turn::Slot(recipe.take().expect("not yet handed"));
                }
                Some(other) => {
                    state.places.insert(self.place, other);
                    None
                }
                None => return Turn::Withdrawn,
            }
        };
        if let Some(handover) = submit {
            self.slots.exec.hand_over(handover);
        }
        tokio::pin!(give_up);
        let mut gave_up = false;
        loop {
            tokio::select! {
                biased;
                handed = &mut self.handed => return match handed {
                    Ok(Handed::Started(started)) => Turn::Started {
                        child: started.and_then(Child::supervise),
                        waited,
                    },
                    Ok(Handed::Slot) => match recipe.take() {
                        Some(recipe) => Turn::Slot(recipe),
                        None => unreachable!("an armed try is started, not told"),
                    },
                    // The line was closed (a shutdown).
                    Err(_) => Turn::Withdrawn,
                },
                () = &mut give_up, if !gave_up => {
                    gave_up = true;
                    if self.withdraw() {
                        return Turn::Withdrawn;
                    }
                    // Handed over already: its start is on its way.
                }
            }
        }
    }

    /// Leaves the line if still in it (without a slot).
    fn withdraw(&self) -> bool {
        let mut state = self.slots.state();
        match state.places.get(&self.place) {
            Some(Place::Waiting(_) | Place::Armed(..)) => {
                state.places.remove(&self.place);
                state.line.retain(|place| *place != self.place);
                true
            }
            _ => false,
        }
    }

    /// The try's process has exited: its slot goes to the next try (unless
    /// the spawner thread that saw the exit first did that already).
    pub(crate) fn release(&self) {
        self.slots.release_and_hand_over(self.place);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let unclaimed = {
            let mut state = self.slots.state();
            match state.places.remove(&self.place) {
                Some(Place::Waiting(_) | Place::Armed(..)) => {
                    state.line.retain(|place| *place != self.place);
                    return;
                }
                Some(Place::Starting(_)) => {
                    state.places.insert(self.place, Place::Abandoned);
                    return;
                }
                Some(Place::Holding) => {
                    state.places.insert(self.place, Place::Holding);
                    // A process delivered but never taken must not run
                    // unsupervised.
                    match self.handed.try_recv() {
                        Ok(Handed::Started(Ok(started))) => Some(started),
                        _ => None,
                    }
                }
                Some(Place::Abandoned) => {
                    state.places.insert(self.place, Place::Abandoned);
                    return;
                }
                None => return,
            }
        };
        if let Some(started) = unclaimed {
            started.kill_and_reap();
        }
        self.slots.release_and_hand_over(self.place);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::supervisor::spawner::tests::recipe;

    /// Polls `condition` every millisecond, for at most 20 s.
    async fn until(what: &str, condition: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !condition() {
            assert!(tokio::time::Instant::now() < deadline, "waited for {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn started(turn: Turn) -> (Child, bool) {
        match turn {
            Turn::Started { child, waited } => (child.expect("started"), waited),
            Turn::Slot(_) => panic!("told to start itself"),
            Turn::Withdrawn => panic!("withdrawn"),
        }
    }

    /// A try holding the only slot, running `sleep` until it is killed.
    async fn holder(slots: &Arc<Slots>) -> (Ticket, Child) {
        let mut ticket = slots.join(1);
        let turn = ticket
            .start(recipe("/bin/sleep", &["1000"]), std::future::pending())
            .await;
        let (child, waited) = started(turn);
        assert!(!waited, "the slot was free");
        (ticket, child)
    }

    fn kill(child: &Child) {
        // SAFETY: a signal to our own, unreaped, child.
        unsafe { libc::kill(child.pid as libc::pid_t, libc::SIGKILL) };
    }

    #[tokio::test]
    async fn an_exit_starts_the_armed_try_and_its_slot_is_handed_over_once() {
        let slots = Slots::new(Exec::start(vec![]).unwrap());
        let (first, mut first_child) = holder(&slots).await;
        let mut second = slots.join(1);
        let third = slots.join(1);
        let armed = second.place;
        let waiting = tokio::spawn(async move {
            let turn = second
                .start(recipe("/bin/sleep", &["1000"]), std::future::pending())
                .await;
            (second, turn)
        });
        until("the second try armed", || slots.is_armed(armed)).await;
        assert_eq!(slots.counts(), (1, 2));
        // Only the spawner thread sees this exit: the runtime's side has not
        // released the first slot, yet the second try starts.
        kill(&first_child);
        let (second, turn) = tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .expect("the hand-over started the armed try")
            .unwrap();
        let (mut second_child, waited) = started(turn);
        assert!(waited);
        assert_eq!(slots.counts(), (1, 1));
        // The runtime's release of the same slot comes second and does
        // nothing: the third try still waits.
        first_child.wait().await.unwrap();
        first.release();
        drop(first);
        assert_eq!(slots.counts(), (1, 1), "a slot handed over twice");
        kill(&second_child);
        second_child.wait().await.unwrap();
        second.release();
        // The third try (not armed) was told: it holds the slot.
        assert_eq!(slots.counts(), (1, 0));
        drop(third);
        assert_eq!(slots.counts(), (0, 0));
    }

    #[tokio::test]
    async fn a_try_that_stops_waiting_while_armed_is_never_started() {
        let slots = Slots::new(Exec::start(vec![]).unwrap());
        let (first, mut first_child) = holder(&slots).await;
        let mut second = slots.join(1);
        let turn = second
            .start(recipe("/bin/sleep", &["1000"]), std::future::ready(()))
            .await;
        assert!(matches!(turn, Turn::Withdrawn));
        assert_eq!(slots.counts(), (1, 0));
        kill(&first_child);
        first_child.wait().await.unwrap();
        until("the slot freed", || slots.counts() == (0, 0)).await;
        first.release();
        drop((first, second));
        assert_eq!(slots.counts(), (0, 0));
    }

    #[tokio::test]
    async fn a_try_handed_its_start_before_it_stops_waiting_runs() {
        let slots = Slots::new(Exec::start(vec![]).unwrap());
        let (first, mut first_child) = holder(&slots).await;
        let mut second = slots.join(1);
        let place = second.place;
        let watcher = slots.clone();
        // It stops waiting only once its start has been handed over.
        let give_up = async move { until("the hand-over", || !watcher.is_armed(place)).await };
        let waiting = tokio::spawn(async move {
            let turn = second.start(recipe("/bin/true", &[]), give_up).await;
            (second, turn)
        });
        until("the second try armed", || slots.is_armed(place)).await;
        kill(&first_child);
        let (second, turn) = waiting.await.unwrap();
        let (mut second_child, _) = started(turn);
        assert!(second_child.wait().await.unwrap().success());
        first_child.wait().await.unwrap();
        first.release();
        second.release();
        drop((first, second));
        assert_eq!(slots.counts(), (0, 0));
    }

    #[tokio::test]
    async fn a_closed_line_never_starts_its_armed_tries() {
        let slots = Slots::new(Exec::start(vec![]).unwrap());
        let (first, mut first_child) = holder(&slots).await;
        let mut second = slots.join(1);
        let place = second.place;
        let waiting = tokio::spawn(async move {
            second
                .start(recipe("/bin/sleep", &["1000"]), std::future::pending())
                .await
        });
        until("the second try armed", || slots.is_armed(place)).await;
        slots.close();
        assert!(matches!(waiting.await.unwrap(), Turn::Withdrawn));
        kill(&first_child);
        first_child.wait().await.unwrap();
        until("the slot freed", || slots.counts() == (0, 0)).await;
        drop(first);
        assert_eq!(slots.counts(), (0, 0));
    }
}
