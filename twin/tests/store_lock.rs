//! One store per data directory; a store whose journal fails refuses every later write.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

mod store_common;

use store_common::{options, set_n, thing};
use twin::store::{EmbeddedStore, StoreError, TwinStore, TwinStoreExt, WriteError};

#[test]
fn a_second_open_of_the_same_directory_fails_while_the_first_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let first = EmbeddedStore::open(options(dir.path())).unwrap();
    let error = EmbeddedStore::open(options(dir.path()))
        .map(|_| ())
        .unwrap_err();
    assert!(matches!(error, StoreError::InUse { .. }), "{error}");
    let message = error.to_string();
    assert!(message.contains("is in use"), "{message}");
    assert!(message.contains(dir.path().to_str().unwrap()), "{message}");

    first.close().unwrap();
    // Closed (not even dropped): the directory is free again.
    let second = EmbeddedStore::open(options(dir.path())).unwrap();
    drop(second);
    drop(first);
    EmbeddedStore::open(options(dir.path())).unwrap();
}

#[test]
fn after_a_journal_io_error_every_write_fails_and_reopening_keeps_what_was_durable() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.segment_max_bytes = 1; // a new segment before every batch
    let store = EmbeddedStore::open(opts.clone()).unwrap();
    set_n(&store, "ns:t", 0).durable.wait().unwrap();
    set_n(&store, "ns:t", 1).durable.wait().unwrap();
    // The writer's next segment will be `journal-…3.log`: a directory in its way makes
    // creating it fail (an I/O error that even root gets).
    let blocker = dir.path().join("journal-00000000000000000003.log");
    std::fs::create_dir(&blocker).unwrap();

    let error = set_n(&store, "ns:t", 2).durable.wait().unwrap_err();
    assert!(matches!(error, StoreError::Failed { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("journal-00000000000000000003.log"),
        "{error}"
    );
    let later = store.write(&thing("ns:t"), |_| -> Result<Vec<twin::Event>, ()> {
        panic!("decide must not run on a failed store")
    });
    assert!(
        matches!(later, Err(WriteError::Store(StoreError::Failed { .. }))),
        "{later:?}"
    );
    // Close reports the failure and still releases the directory.
    assert!(matches!(store.close(), Err(StoreError::Failed { .. })));

    std::fs::remove_dir(&blocker).unwrap();
    let store = EmbeddedStore::open(opts).unwrap();
    assert_eq!(store.get(&thing("ns:t")).unwrap().revision, 2);
    set_n(&store, "ns:t", 2).durable.wait().unwrap();
}
