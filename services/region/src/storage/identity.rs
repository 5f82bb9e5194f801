//! The data directory's identity stamp (DESIGN.md, "Identity").

use super::tables::{
    meta, APPLIED, BUCKETS, IDEMPOTENCY, KEYS, LOG, META, PEER_CURSORS, SCHEMA_VERSION, TOMBSTONES,
};
use super::{IdempotencyRecord, StorageError};
use meridian_shared::{Actor, RegionName};
use redb::{Database, ReadableDatabase, ReadableTable, WriteTransaction};

/// Who a data directory belongs to, and which incarnation of that region it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Region name stamped at creation.
    pub region: RegionName,
    /// Cluster id stamped at creation.
    pub cluster_id: String,
    /// Incarnation minted at creation; the CRDT actor for this region's writes.
    pub incarnation: Actor,
}

/// Stamps a fresh database or checks an existing stamp; returns the identity and last sequence.
pub fn stamp_or_check(
    db: &Database,
    region: &RegionName,
    cluster_id: &str,
) -> Result<(Identity, u64), StorageError> {
    let read = db.begin_read()?;
    let stamped = match read.open_table(META) {
        Ok(table) => {
            let get = |k: &str| -> Result<Option<Vec<u8>>, StorageError> {
                Ok(table.get(k)?.map(|v| v.value().to_vec()))
            };
            match (
                get(meta::REGION)?,
                get(meta::CLUSTER_ID)?,
                get(meta::INCARNATION)?,
            ) {
                (Some(r), Some(c), Some(i)) => {
                    Some((r, c, i, get(meta::SCHEMA)?, get(meta::LAST_SEQ)?))
                }
                _ => None,
            }
        }
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.into()),
    };
    drop(read);

    let Some((r, c, i, schema, last_seq)) = stamped else {
        return create(db, region, cluster_id);
    };
    let stamped_region = String::from_utf8_lossy(&r).into_owned();
    let stamped_cluster = String::from_utf8_lossy(&c).into_owned();
    if stamped_region != region.as_str() || stamped_cluster != cluster_id {
        return Err(StorageError::WrongOwner(format!(
            "data directory belongs to region {stamped_region:?} of cluster {stamped_cluster:?}, \
             not region {:?} of cluster {cluster_id:?}",
            region.as_str()
        )));
    }
    if schema.as_deref() != Some(&[SCHEMA_VERSION][..]) {
        return Err(StorageError::WrongOwner(format!(
            "data directory has schema version {schema:?}; this build reads {SCHEMA_VERSION}"
        )));
    }
    let incarnation = Actor::from_slice(&i)
        .map_err(|_| StorageError::Corrupt("incarnation stamp is not a UUID".into()))?;
    let last_seq = match last_seq {
        Some(bytes) => u64::from_be_bytes(
            bytes
                .try_into()
                .map_err(|_| StorageError::Corrupt("last_seq is not 8 bytes".into()))?,
        ),
        None => 0,
    };
    let identity = Identity {
        region: region.clone(),
        cluster_id: cluster_id.to_string(),
        incarnation,
    };
    Ok((identity, last_seq))
}

/// Creates every table and stamps a new incarnation, in one durable transaction.
fn create(
    db: &Database,
    region: &RegionName,
    cluster_id: &str,
) -> Result<(Identity, u64), StorageError> {
    // v7 UUIDs sort by creation time, which makes incarnations easy to read in clocks and logs.
    let incarnation = Actor::now_v7();
    let txn = db.begin_write()?;
    {
        let mut meta_table = txn.open_table(META)?;
        meta_table.insert(meta::REGION, region.as_str().as_bytes())?;
        meta_table.insert(meta::CLUSTER_ID, cluster_id.as_bytes())?;
        meta_table.insert(meta::INCARNATION, &incarnation.as_bytes()[..])?;
        meta_table.insert(meta::SCHEMA, &[SCHEMA_VERSION][..])?;
        meta_table.insert(meta::LAST_SEQ, &0u64.to_be_bytes()[..])?;
        txn.open_table(KEYS)?;
        txn.open_table(LOG)?;
        txn.open_table(BUCKETS)?;
        txn.open_table(IDEMPOTENCY)?;
        txn.open_table(PEER_CURSORS)?;
        txn.open_table(APPLIED)?;
        txn.open_table(TOMBSTONES)?;
    }
    txn.commit()?;
    let identity = Identity {
        region: region.clone(),
        cluster_id: cluster_id.to_string(),
        incarnation,
    };
    Ok((identity, 0))
}

/// Mints a new incarnation after `old`: new id, empty log, sequence and cursors reset, in one
/// transaction. With `forget_states` (a restored old copy) key states and the applied vector
/// go too, and the commit counter jumps to `commits`: the region starts empty and catches up.
pub fn reincarnate(
    db: &Database,
    old: Actor,
    forget_states: bool,
    commits: u64,
) -> Result<Actor, StorageError> {
    let incarnation = Actor::now_v7();
    let txn = db.begin_write()?;
    own_answers_belong_to(&txn, old)?;
    {
        let mut meta_table = txn.open_table(META)?;
        if forget_states {
            meta_table.insert(meta::COMMITS, &commits.to_be_bytes()[..])?;
            txn.delete_table(KEYS)?;
            txn.open_table(KEYS)?;
            txn.delete_table(TOMBSTONES)?;
            txn.open_table(TOMBSTONES)?;
            txn.delete_table(APPLIED)?;
            txn.open_table(APPLIED)?;
        }
        meta_table.insert(meta::INCARNATION, &incarnation.as_bytes()[..])?;
        meta_table.insert(meta::LAST_SEQ, &0u64.to_be_bytes()[..])?;
        meta_table.insert(meta::LOG_BYTES, &0u64.to_be_bytes()[..])?;
        txn.delete_table(LOG)?;
        txn.open_table(LOG)?;
        txn.delete_table(PEER_CURSORS)?;
        txn.open_table(PEER_CURSORS)?;
    }
    txn.commit()?;
    Ok(incarnation)
}

/// Names incarnation `old` as the origin of this region's own idempotency records. They name
/// their writes by sequence number alone, and those numbers are the old incarnation's now: a
/// replayed answer's session token must not claim them of the new one.
fn own_answers_belong_to(txn: &WriteTransaction, old: Actor) -> Result<(), StorageError> {
    let mut table = txn.open_table(IDEMPOTENCY)?;
    let mut own = Vec::new();
    for entry in table.iter()? {
        let (id, bytes) = entry?;
        // A record that cannot be read is left as it is: its replay fails the same way.
        if let Ok(mut record) = IdempotencyRecord::decode(bytes.value()) {
            if record.origin.is_none() {
                record.origin = Some(old);
                own.push((id.value(), record.encode()));
            }
        }
    }
    for (id, bytes) in own {
        table.insert(id, bytes.as_slice())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(origin: Option<Actor>, seq: u64) -> IdempotencyRecord {
        IdempotencyRecord {
            fingerprint: 1,
            status: 200,
            body: b"{}".to_vec(),
            seq,
            created_ms: 0,
            origin,
        }
    }

    #[test]
    fn own_idempotency_answers_name_the_incarnation_that_wrote_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Database::create(dir.path().join("state.redb")).expect("create");
        let region = RegionName::new("us-east").expect("region name");
        let (identity, _) = stamp_or_check(&db, &region, "test").expect("stamp");
        let peer = Actor::from_u128(7);
        let txn = db.begin_write().expect("write");
        {
            let mut table = txn.open_table(IDEMPOTENCY).expect("table");
            table
                .insert(1, record(None, 41).encode().as_slice())
                .expect("own");
            table
                .insert(2, record(Some(peer), 9).encode().as_slice())
                .expect("peer's");
        }
        txn.commit().expect("commit");

        let new = reincarnate(&db, identity.incarnation, false, 0).expect("reincarnate");
        assert_ne!(new, identity.incarnation);
        let read = db.begin_read().expect("read");
        let table = read.open_table(IDEMPOTENCY).expect("table");
        let get = |id: u128| {
            let bytes = table.get(id).expect("get").expect("present");
            IdempotencyRecord::decode(bytes.value()).expect("decode")
        };
        assert_eq!(get(1), record(Some(identity.incarnation), 41));
        assert_eq!(get(2), record(Some(peer), 9));
    }
}
