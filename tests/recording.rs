//! The recorder's writes about one try are applied in the order they were
//! queued, even when one batch holds several of them.

use taskrunner::request::{RequestId, State};
use taskrunner::store::{Outcome, Purpose, Store, Write};

use crate::util::{Backend, TestDb};

both_backends!(a_give_back_queued_behind_an_outcome_never_overrides_it);

fn outcome(id: RequestId, state: State, give_back_try: bool) -> Write {
    Write::Outcome(Outcome {
        id,
        claim_token: "claim-1".into(),
        state,
        result_text: format!("{state:?}"),
        retry_after: None,
        give_back_try,
        composed: false,
    })
}

/// A try ends FINISHED and its outcome waits in the recorder's queue; the
/// heartbeat, seeing the row still held with no try running it, queues a
/// give-back behind it. When both land in one batch, the outcome stands:
/// the give-back (a write about the same claim, made after it) changes
/// nothing, and the finished work is not run again.
async fn a_give_back_queued_behind_an_outcome_never_overrides_it(backend: Backend) {
    let db = TestDb::new(backend).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(db.enqueue("NoOp", None).await);
    }
    db.execute(
        "UPDATE task_runner_requests SET result = 'RUNNING', claim_token = 'claim-1', tries = 1",
    )
    .await;
    let store = Store::open(&db.url, Purpose::Cli).unwrap();
    let batch = vec![
        outcome(ids[0], State::Finished, false),
        outcome(ids[1], State::Finished, false),
        outcome(ids[0], State::Interrupted, true),
        outcome(ids[2], State::Failed, false),
        outcome(ids[2], State::Interrupted, true),
    ];
    let applied = store.record(&batch).await.unwrap();
    assert_eq!(applied, vec![true, true, false, true, false]);
    for (id, result) in [
        (ids[0], "FINISHED"),
        (ids[1], "FINISHED"),
        (ids[2], "FAILED"),
    ] {
        let row = store.show(id).await.unwrap().unwrap();
        assert_eq!(
            row.result.as_deref(),
            Some(result),
            "request {id}: {row:#?}"
        );
        assert_eq!(row.tries, 1, "request {id}: its try counts");
    }
    store.close().await;
}
