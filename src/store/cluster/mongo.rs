//! The MongoDB side of cluster mode: the system of record.
//!
//! ```text
//! activities  {_id: actId, name, desc, image, start_ms, end_ms, per_user_limit}
//! tickets     {_id: ticketId, activity_id, name, desc}
//! codes       {_id: code, code, ticket_id, activity_id}   unique (ticket_id, code)
//! claims      {_id: code, claim_id, activity_id, ticket_id, code, user_id, n,
//!              claimed_at, claimed_at_ms, node, idempotency_key}
//!                                                          unique (activity_id, user_id, n)
//! claim_conflicts {_id: "code:claim_id", ...as claims}   a second acknowledged claim
//!                                                          of a code or of a user's nth
//! users       {_id: id, username, skeleton, nickname, password_hash, created_at_ms}
//!                                                          unique username, unique sparse skeleton
//! meta        {_id: "secret.<name>", value}, {_id: "migration.skeletons", upto}
//! revoked_sessions, stats_outcome_ticks (stats_outcomes: earlier versions'), stats_sources, stats_latency
//! ```
//!
//! Claims are keyed by their code, so writing one twice (a retried bulk
//! insert, or two nodes draining the same backlog) is a duplicate-key error
//! that is ignored: writing a claim is idempotent. A duplicate that is not
//! the same claim (another user's, or another code for the same user's
//! `n`th) is kept apart in `claim_conflicts` ([`insert_claims`]).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use futures_util::TryStreamExt;
use mongodb::{
    bson::{doc, Bson, DateTime, Document},
    error::{Error as MongoError, ErrorKind},
    options::IndexOptions,
    Collection, Database, IndexModel,
};

use super::record::Record;
use crate::{
    config::{ActivityConfig, Config},
    stats::StatsBatch,
    store::types::{
        code_rng, generate_code, issued_ids, issued_of_hex, ClaimRow, ImportReport, NewUser, ReportData, Revocation,
        StoreError, TicketImport, TicketReport, User, UserPage, REVOKED_PER_ACCOUNT,
    },
    vocab::Claim,
};

/// MongoDB's duplicate key error.
const DUPLICATE_KEY: i32 = 11000;

fn coll(db: &Database, name: &str) -> Collection<Document> {
    db.collection(name)
}

/// Creates the indexes every write relies on. Idempotent.
pub async fn ensure_indexes(db: &Database) -> Result<(), MongoError> {
    let unique = || IndexOptions::builder().unique(true).build();
    let index = |keys: Document, unique_: bool| {
        let model = IndexModel::builder().keys(keys);
        if unique_ {
            model.options(unique()).build()
        } else {
            model.build()
        }
    };
    coll(db, "codes")
        .create_index(index(doc! {"ticket_id": 1, "code": 1}, true))
        .await?;
    let claims = coll(db, "claims");
    claims
        .create_index(index(doc! {"activity_id": 1, "user_id": 1, "n": 1}, true))
        .await?;
    claims
        .create_index(index(doc! {"activity_id": 1, "claimed_at_ms": 1}, false))
        .await?;
    claims.create_index(index(doc! {"ticket_id": 1}, false)).await?;
    // A fan's claims in the activities no node sells any more.
    claims
        .create_index(index(doc! {"user_id": 1, "activity_id": 1}, false))
        .await?;
    coll(db, "users")
        .create_index(index(doc! {"username": 1}, true))
        .await?;
    // Sparse: accounts from before look-alike keys, not keyed (yet), never collide.
    coll(db, "users")
        .create_index(
            IndexModel::builder()
                .keys(doc! {"skeleton": 1})
                .options(IndexOptions::builder().unique(true).sparse(true).build())
                .build(),
        )
        .await?;
    // Expired revocations are deleted at every refresh, which reads the
    // latest ones.
    coll(db, "revoked_sessions")
        .create_index(index(doc! {"expires_at_ms": 1}, false))
        .await?;
    coll(db, "revoked_sessions")
        .create_index(index(doc! {"revoked_at_ms": 1}, false))
        .await?;
    // An account's logouts, latest issued first (token ids begin with
    // their issue time), at each logout.
    coll(db, "revoked_sessions")
        .create_index(index(doc! {"user_id": 1, "_id": -1}, false))
        .await?;
    // The report reads one activity's statistics; outcomes come ten rows a
    // second per outcome while a rush runs.
    coll(db, "stats_outcome_ticks")
        .create_index(index(doc! {"activity_id": 1, "at_ms": 1}, false))
        .await?;
    for name in ["stats_outcomes", "stats_sources", "stats_latency"] {
        coll(db, name)
            .create_index(index(doc! {"activity_id": 1}, false))
            .await?;
    }
    // The report's top sources of each kind, without sorting them all.
    coll(db, "stats_sources")
        .create_index(index(
            doc! {"activity_id": 1, "kind": 1, "requests": -1, "source": 1},
            false,
        ))
        .await?;
    Ok(())
}

/// Indexes of the documents an unordered insert refused as duplicates; any
/// other failure is an error.
fn duplicates(result: Result<(), MongoError>, sent: usize) -> Result<HashSet<usize>, MongoError> {
    match result {
        Ok(()) => Ok(HashSet::new()),
        Err(e) => match e.kind.as_ref() {
            ErrorKind::InsertMany(m) if m.write_concern_error.is_none() => {
                let errors = m.write_errors.as_deref().unwrap_or_default();
                // The indexes are the server's word, passed on unchecked by
                // the driver: one past what was sent is an answer not
                // understood, not a record to look up (and panic on).
                if errors.iter().all(|w| w.code == DUPLICATE_KEY && w.index < sent) {
                    Ok(errors.iter().map(|w| w.index).collect())
                } else {
                    Err(e)
                }
            }
            _ => Err(e),
        },
    }
}

async fn insert_unordered(coll: &Collection<Document>, docs: Vec<Document>) -> Result<HashSet<usize>, MongoError> {
    if docs.is_empty() {
        return Ok(HashSet::new());
    }
    let sent = docs.len();
    duplicates(coll.insert_many(docs).ordered(false).await.map(|_| ()), sent)
}

/// Every stored ticket type's activity, to refuse an import that would
/// move one ([`Config::moved_from`]).
pub async fn ticket_activities(db: &Database) -> Result<HashMap<String, String>, MongoError> {
    let mut found = coll(db, "tickets")
        .find(doc! {})
        .projection(doc! {"activity_id": 1})
        .await?;
    let mut owners = HashMap::new();
    while let Some(d) = found.try_next().await? {
        if let (Ok(ticket), Ok(activity)) = (d.get_str("_id"), d.get_str("activity_id")) {
            owners.insert(ticket.to_owned(), activity.to_owned());
        }
    }
    Ok(owners)
}

/// The config's listed codes that MongoDB holds under another ticket type:
/// up to [`StoreError::CODES_NAMED`] of them described, and how many in
/// all. Read before an import writes anything, so that it can refuse the
/// config whole ([`StoreError::codes_of_other_tickets`]).
pub async fn codes_of_other_tickets(db: &Database, config: &Config) -> Result<(Vec<String>, usize), MongoError> {
    let codes = coll(db, "codes");
    let (mut named, mut total) = (Vec::new(), 0);
    for t in config.activities.iter().flat_map(|a| &a.tickets) {
        for chunk in t.explicit_codes().chunks(1000) {
            let mut owners = codes
                .find(doc! {"_id": {"$in": chunk}, "ticket_id": {"$ne": &t.id}})
                .projection(doc! {"ticket_id": 1})
                .await?;
            while let Some(d) = owners.try_next().await? {
                total += 1;
                if named.len() < StoreError::CODES_NAMED {
                    named.push(StoreError::held_elsewhere(
                        d.get_str("_id").unwrap_or_default(),
                        &t.id,
                        d.get_str("ticket_id").unwrap_or_default(),
                    ));
                }
            }
        }
    }
    Ok((named, total))
}

/// Writes the config's activities, tickets and codes; returns what was new.
pub async fn import(db: &Database, config: &Config, node_start_ms: i64) -> Result<ImportReport, MongoError> {
    let mut report = ImportReport::default();
    let (activities, tickets, codes, claims) = (
        coll(db, "activities"),
        coll(db, "tickets"),
        coll(db, "codes"),
        coll(db, "claims"),
    );
    for a in &config.activities {
        // Retired: stored, with no definition for the nodes to serve.
        let retired = activities
            .find_one(doc! {"_id": &a.id, "definition": {"$exists": false}})
            .projection(doc! {"_id": 1})
            .await?;
        if retired.is_some() {
            report.revived.push(a.id.clone());
        }
        let mut set = doc! {
            "name": &a.name, "desc": &a.desc, "image": &a.image,
            "end_ms": a.end_time.resolve(node_start_ms),
            "per_user_limit": i64::from(a.per_user_limit),
            "definition": a.definition(),
        };
        // Once the activity has claims, the start the report counts from
        // may move earlier, not later (as the embedded store keeps it); the
        // nodes sell by the definition's.
        let start_ms = a.start_time.resolve(node_start_ms);
        let later = activities
            .find_one(doc! {"_id": &a.id, "start_ms": {"$lt": start_ms}})
            .projection(doc! {"_id": 1})
            .await?
            .is_some();
        let sold = later
            && claims
                .find_one(doc! {"activity_id": &a.id})
                .projection(doc! {"_id": 1})
                .await?
                .is_some();
        if !sold {
            set.insert("start_ms", start_ms);
        }
        activities
            .update_one(doc! {"_id": &a.id}, doc! {"$set": set})
            .upsert(true)
            .await?;
        report.activities += 1;
        for t in &a.tickets {
            tickets
                .update_one(
                    doc! {"_id": &t.id},
                    doc! {"$set": {"activity_id": &a.id, "name": &t.name, "desc": &t.desc}},
                )
                .upsert(true)
                .await?;
            let mut added = Vec::new();
            for chunk in t.explicit_codes().chunks(1000) {
                let docs = chunk.iter().map(|c| code_doc(c, &t.id, &a.id)).collect();
                let dup = insert_unordered(&codes, docs).await?;
                let mut refused = Vec::new();
                for (i, c) in chunk.iter().enumerate() {
                    if dup.contains(&i) {
                        refused.push(c.clone());
                    } else {
                        added.push(c.clone());
                    }
                }
                if !refused.is_empty() {
                    let mut owners = codes
                        .find(doc! {"_id": {"$in": &refused}, "ticket_id": {"$ne": &t.id}})
                        .await?;
                    while let Some(d) = owners.try_next().await? {
                        report.conflicts.push(StoreError::held_elsewhere(
                            d.get_str("_id").unwrap_or_default(),
                            &t.id,
                            d.get_str("ticket_id").unwrap_or_default(),
                        ));
                    }
                }
            }
            if let Some(target) = t.generate {
                let mut have = codes.count_documents(doc! {"ticket_id": &t.id}).await? as usize;
                let mut rng = code_rng();
                while have < target as usize {
                    let batch: Vec<String> = {
                        (0..(target as usize - have).min(1000))
                            .map(|_| generate_code(&mut rng))
                            .collect()
                    };
                    let docs = batch.iter().map(|c| code_doc(c, &t.id, &a.id)).collect();
                    let dup = insert_unordered(&codes, docs).await?;
                    for (i, c) in batch.into_iter().enumerate() {
                        if !dup.contains(&i) {
                            added.push(c);
                            have += 1;
                        }
                    }
                }
            }
            let total = codes.count_documents(doc! {"ticket_id": &t.id}).await? as usize;
            report.tickets.push(TicketImport {
                ticket_id: t.id.clone(),
                added,
                total,
            });
        }
    }
    Ok(report)
}

/// Takes `activity`'s stored definition away, so the nodes that serve
/// MongoDB's activities stop listing and selling it; its documents and
/// claims stay. Whether there was one.
pub async fn retire(db: &Database, activity: &str) -> Result<bool, MongoError> {
    let done = coll(db, "activities")
        .update_one(
            doc! {"_id": activity, "definition": {"$exists": true}},
            doc! {"$unset": {"definition": ""}},
        )
        .await?;
    Ok(done.matched_count == 1)
}

/// Every activity `ticketd import` ever wrote, retired ones too: the ids
/// whose claims can wait in a backlog in Redis (an activity's codes come
/// only from an import).
pub async fn activity_ids(db: &Database) -> Result<Vec<String>, MongoError> {
    let mut cursor = coll(db, "activities").find(doc! {}).projection(doc! {"_id": 1}).await?;
    let mut out = Vec::new();
    while let Some(d) = cursor.try_next().await? {
        out.push(text(&d, "_id"));
    }
    Ok(out)
}

/// The activity definitions `ticketd import` stored, by start time and id.
pub async fn activities(db: &Database) -> Result<Vec<ActivityConfig>, StoreError> {
    let mut cursor = coll(db, "activities")
        .find(doc! {"definition": {"$exists": true}})
        .sort(doc! {"start_ms": 1, "_id": 1})
        .await?;
    let mut out = Vec::new();
    while let Some(d) = cursor.try_next().await? {
        let json = d.get_str("definition").unwrap_or_default();
        match serde_json::from_str(json) {
            Ok(a) => out.push(a),
            Err(e) => {
                tracing::warn!(activity = %text(&d, "_id"), error = %e, "Skipping an activity definition this version cannot read.")
            }
        }
    }
    Ok(out)
}

fn code_doc(code: &str, ticket: &str, activity: &str) -> Document {
    doc! {"_id": code, "code": code, "ticket_id": ticket, "activity_id": activity}
}

/// The codes of `ticket` that MongoDB has no claim for.
pub async fn unclaimed_codes(db: &Database, ticket: &str) -> Result<Vec<String>, MongoError> {
    let mut codes = codes_of_ticket(db, ticket).await?;
    let mut cursor = coll(db, "claims")
        .find(doc! {"ticket_id": ticket})
        .projection(doc! {"_id": 1})
        .await?;
    while let Some(d) = cursor.try_next().await? {
        if let Ok(code) = d.get_str("_id") {
            codes.remove(code);
        }
    }
    Ok(codes.into_iter().collect())
}

/// Inserts claim records; returns those that conflict with a stored claim.
///
/// A record refused as a duplicate is mostly this writer's own retry (the
/// same claim again, after a write whose acknowledgement was lost): fine.
/// But a stored claim of the same code for someone else, or of the same
/// user's `n`th claim with another code, means two acknowledged claims
/// disagree (a Redis that lost writes: run without `appendfsync always` or
/// failed over without `replica_acks`). Counting that as written lost the
/// second claim from MongoDB without a word; it is now kept in
/// `claim_conflicts` for the operator, and returned to be reported.
pub async fn insert_claims(db: &Database, records: &[Record]) -> Result<Vec<Record>, MongoError> {
    let docs: Vec<Document> = records.iter().map(claim_doc).collect();
    let refused = insert_unordered(&coll(db, "claims"), docs).await?;
    if refused.is_empty() {
        return Ok(Vec::new());
    }
    // One read for all the refused: a retried batch refuses every record.
    let codes: Vec<&str> = refused.iter().map(|&i| records[i].code.as_str()).collect();
    let mut stored: HashMap<String, (i64, i64)> = HashMap::new();
    let mut found = coll(db, "claims")
        .find(doc! {"_id": {"$in": codes}})
        .projection(doc! {"user_id": 1, "claim_id": 1})
        .await?;
    while let Some(d) = found.try_next().await? {
        if let (Ok(code), Ok(user), Ok(id)) = (d.get_str("_id"), d.get_i64("user_id"), d.get_i64("claim_id")) {
            stored.insert(code.to_owned(), (user, id));
        }
    }
    let conflicts: Vec<Record> = refused
        .iter()
        .map(|&i| &records[i])
        .filter(|r| stored.get(&r.code) != Some(&(r.user as i64, r.id as i64)))
        .cloned()
        .collect();
    if !conflicts.is_empty() {
        let docs = conflicts
            .iter()
            .map(|r| {
                let mut d = claim_doc(r);
                d.insert("_id", format!("{}:{}", r.code, r.id));
                d
            })
            .collect();
        insert_unordered(&coll(db, "claim_conflicts"), docs).await?;
    }
    Ok(conflicts)
}

fn claim_doc(r: &Record) -> Document {
    doc! {
                "_id": &r.code,
                "claim_id": r.id as i64,
                "activity_id": &r.activity,
                "ticket_id": &r.ticket,
                "code": &r.code,
                "user_id": r.user as i64,
                "n": r.n as i64,
                "claimed_at": DateTime::from_millis(r.ms),
                "claimed_at_ms": r.ms,
                "node": &r.node,
        "idempotency_key": if r.key.is_empty() { Bson::Null } else { Bson::String(r.key.clone()) },
    }
}

fn user_from(d: &Document) -> Option<User> {
    Some(User {
        id: d.get_i64("_id").ok()? as u64,
        username: d.get_str("username").ok()?.to_owned(),
        nickname: d.get_str("nickname").ok()?.to_owned(),
        password_hash: d.get_str("password_hash").ok()?.to_owned(),
        created_at_ms: d.get_i64("created_at_ms").ok()?,
    })
}

/// A user document.
pub fn user_doc(id: u64, user: &NewUser) -> Document {
    doc! {
        "_id": id as i64, "username": &user.username, "skeleton": &user.skeleton, "nickname": &user.nickname,
        "password_hash": &user.password_hash, "created_at_ms": user.created_at_ms,
    }
}

/// Keys the accounts without a skeleton (see `Store::index_skeletons`).
/// The sparse index cannot find documents without the field, so a pass
/// scans by id, from the highest id the last pass saw (kept in `meta`):
/// the first pass reads every account, later ones only accounts made since,
/// such as those an older node wrote without a skeleton during a rolling
/// upgrade.
pub async fn index_skeletons(db: &Database, skeleton: fn(&str) -> String) -> Result<usize, MongoError> {
    const MARK: &str = "migration.skeletons";
    let meta = coll(db, "meta");
    let from = meta.find_one(doc! {"_id": MARK}).await?.map_or(0, |d| int(&d, "upto"));
    let upto = i64::try_from(max_user_id(db).await?).unwrap_or(i64::MAX);
    let users = coll(db, "users");
    let mut unkeyed = users
        .find(doc! {"_id": {"$gt": from, "$lte": upto}, "skeleton": {"$exists": false}})
        .projection(doc! {"username": 1})
        .sort(doc! {"_id": 1})
        .await?;
    let mut keyed = 0;
    while let Some(d) = unkeyed.try_next().await? {
        let (Some(id), Ok(name)) = (d.get("_id"), d.get_str("username")) else {
            continue;
        };
        let set = users
            .update_one(
                doc! {"_id": id, "skeleton": {"$exists": false}},
                doc! {"$set": {"skeleton": skeleton(name)}},
            )
            .await;
        match set {
            Ok(r) => keyed += r.modified_count as usize,
            // A look-alike keyed first keeps the key.
            Err(e) if is_duplicate(&e) => {}
            Err(e) => return Err(e),
        }
    }
    if upto > from {
        meta.update_one(doc! {"_id": MARK}, doc! {"$set": {"upto": upto}})
            .upsert(true)
            .await?;
    }
    Ok(keyed)
}

fn is_duplicate(e: &MongoError) -> bool {
    matches!(e.kind.as_ref(), ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) if w.code == DUPLICATE_KEY)
}

/// Inserts user documents; returns the indexes refused as duplicates (a
/// taken username, or an id already used).
pub async fn insert_users(db: &Database, docs: Vec<Document>) -> Result<HashSet<usize>, MongoError> {
    insert_unordered(&coll(db, "users"), docs).await
}

/// Which of `values` of `field` (`username` or `skeleton`) are registered.
pub async fn existing(db: &Database, field: &str, values: &[&str]) -> Result<HashSet<String>, MongoError> {
    let mut cursor = coll(db, "users")
        .find(doc! {field: {"$in": values}})
        .projection(doc! {field: 1})
        .await?;
    let mut out = HashSet::new();
    while let Some(d) = cursor.try_next().await? {
        out.insert(text(&d, field));
    }
    Ok(out)
}

/// The highest user id in use (0 when there are none).
pub async fn max_user_id(db: &Database) -> Result<u64, MongoError> {
    let top = coll(db, "users")
        .find_one(doc! {})
        .sort(doc! {"_id": -1})
        .projection(doc! {"_id": 1})
        .await?;
    Ok(top.map_or(0, |d| int(&d, "_id").max(0) as u64))
}

/// The user called `username`.
pub async fn user_by_name(db: &Database, username: &str) -> Result<Option<User>, MongoError> {
    Ok(coll(db, "users")
        .find_one(doc! {"username": username})
        .await?
        .as_ref()
        .and_then(user_from))
}

/// Replaces a user's password hash, only if it is still `old` when given;
/// whether a user's was replaced.
pub async fn set_password_hash(db: &Database, user_id: u64, old: Option<&str>, hash: &str) -> Result<bool, MongoError> {
    let mut filter = doc! {"_id": user_id as i64};
    if let Some(old) = old {
        filter.insert("password_hash", old);
    }
    let done = coll(db, "users")
        .update_one(filter, doc! {"$set": {"password_hash": hash}})
        .await?;
    Ok(done.matched_count == 1)
}

/// The user whose look-alike key is `skeleton`.
pub async fn user_by_skeleton(db: &Database, skeleton: &str) -> Result<Option<User>, MongoError> {
    Ok(coll(db, "users")
        .find_one(doc! {"skeleton": skeleton})
        .await?
        .as_ref()
        .and_then(user_from))
}

/// Up to `limit` users with ids above `after`, by id. A record that does
/// not read as an account is passed over (and logged), but counts as read,
/// so it does not end the listing early.
pub async fn users_page(db: &Database, after: u64, limit: i64) -> Result<UserPage, MongoError> {
    let mut cursor = coll(db, "users")
        .find(doc! {"_id": {"$gt": after as i64}})
        .sort(doc! {"_id": 1})
        .limit(limit)
        .await?;
    let mut page = UserPage::default();
    while let Some(d) = cursor.try_next().await? {
        page.read += 1;
        let id = d.get_i64("_id").ok().or_else(|| d.get_i32("_id").ok().map(i64::from));
        page.last_id = id.map(|id| id as u64).or(page.last_id);
        match user_from(&d) {
            Some(user) => page.users.push(user),
            None => tracing::warn!(id = ?d.get("_id"), "Passing over a user record this version cannot read."),
        }
    }
    Ok(page)
}

/// The `_id` of `user`'s mark ([`Revocation::Before`]) in
/// `revoked_sessions`: not a token id, so a node of an earlier version
/// passes over it.
fn mark_id(user: u64) -> String {
    format!("before:{user}")
}

/// Records `user`'s logout of `token_id`, then folds the account's
/// earliest issued past [`REVOKED_PER_ACCOUNT`] with an issue time into
/// its mark (token ids sort as their sessions were issued: see
/// [`issued_ids`]). Two logouts of the account through two nodes at once
/// may both fold: the mark only ever moves later (`$max`), and a deleted
/// revocation is one the mark covers.
pub async fn revoke_session(db: &Database, user: u64, token_id: &str, expires_at_ms: i64) -> Result<(), MongoError> {
    let c = coll(db, "revoked_sessions");
    let now = crate::clock::now_ms();
    c.update_one(
        doc! {"_id": token_id},
        doc! {"$setOnInsert": {"user_id": user as i64, "expires_at_ms": expires_at_ms, "revoked_at_ms": now}},
    )
    .upsert(true)
    .await?;
    let (lo, hi) = issued_ids();
    let timed = doc! {"user_id": user as i64, "_id": {"$gte": lo, "$lt": hi}};
    let past = c
        .find_one(timed.clone())
        .sort(doc! {"_id": -1})
        .skip(REVOKED_PER_ACCOUNT as u64)
        .await?;
    let Some((past, issued)) = past.and_then(|d| {
        let id = d.get_str("_id").ok()?.to_owned();
        let issued = issued_of_hex(&id)?;
        Some((id, issued))
    }) else {
        return Ok(());
    };
    // The revocations folded: those read here, and only those are deleted
    // below. (A logout stored meanwhile through another node, with an id
    // under `past`, stays as it is, for the next fold: deleted by a range,
    // it went with an expiry the mark never took, and its session came
    // back once the mark was forgotten.)
    let mut folded = timed;
    folded.insert("_id", doc! {"$gte": issued_ids().0, "$lte": &past});
    let mut found = c.find(folded).projection(doc! {"expires_at_ms": 1}).await?;
    let (mut ids, mut expires) = (Vec::new(), expires_at_ms);
    while let Some(d) = found.try_next().await? {
        if let Ok(id) = d.get_str("_id") {
            ids.push(id.to_owned());
            expires = expires.max(d.get_i64("expires_at_ms").unwrap_or(expires_at_ms));
        }
    }
    c.update_one(
        doc! {"_id": mark_id(user)},
        doc! {
            "$max": {"issued_ms": issued, "expires_at_ms": expires},
            "$set": {"user_id": user as i64, "before": true, "revoked_at_ms": now},
        },
    )
    .upsert(true)
    .await?;
    c.delete_many(doc! {"_id": {"$in": ids}}).await?;
    Ok(())
}

/// Marks every session of `user` issued at or before `issued_ms` logged
/// out until `expires_at_ms`; the mark only moves later (`$max`), as a
/// fold's does, and other nodes read it at their next refresh.
pub async fn revoke_issued_before(
    db: &Database,
    user: u64,
    issued_ms: i64,
    expires_at_ms: i64,
) -> Result<(), MongoError> {
    coll(db, "revoked_sessions")
        .update_one(
            doc! {"_id": mark_id(user)},
            doc! {
                "$max": {"issued_ms": issued_ms, "expires_at_ms": expires_at_ms},
                "$set": {"user_id": user as i64, "before": true, "revoked_at_ms": crate::clock::now_ms()},
            },
        )
        .upsert(true)
        .await?;
    Ok(())
}

/// Revocations not yet expired (expired ones are deleted): all of them,
/// or those written since `since_ms` (by the writing node's clock).
pub async fn revoked_sessions(
    db: &Database,
    now_ms: i64,
    since_ms: Option<i64>,
) -> Result<Vec<Revocation>, MongoError> {
    let c = coll(db, "revoked_sessions");
    c.delete_many(doc! {"expires_at_ms": {"$lt": now_ms}}).await?;
    // (A revocation without the time was written by a node from before
    // it was kept, in a rolling upgrade: read until it expires.)
    let filter = match since_ms {
        Some(since) => doc! {"$or": [
            {"revoked_at_ms": {"$gte": since}},
            {"revoked_at_ms": {"$exists": false}},
        ]},
        None => doc! {},
    };
    let mut cursor = c.find(filter).await?;
    let mut out = Vec::new();
    while let Some(d) = cursor.try_next().await? {
        let (Ok(id), Ok(exp)) = (d.get_str("_id"), d.get_i64("expires_at_ms")) else {
            continue;
        };
        let user = d.get_i64("user_id").ok().map(|u| u as u64);
        out.push(match (user, d.get_i64("issued_ms")) {
            (Some(user), Ok(issued_ms)) if d.get_bool("before").unwrap_or(false) => Revocation::Before {
                user,
                issued_ms,
                expires_at_ms: exp,
            },
            _ => Revocation::Session {
                user,
                token_id: id.to_owned(),
                expires_at_ms: exp,
            },
        });
    }
    Ok(out)
}

/// Deletes the shared secret `name`; whether there was one.
pub async fn forget_secret(db: &Database, name: &str) -> Result<bool, MongoError> {
    let gone = coll(db, "meta")
        .delete_one(doc! {"_id": format!("secret.{name}")})
        .await?;
    Ok(gone.deleted_count > 0)
}

/// A secret shared by every node, created by the first to ask.
pub async fn secret(db: &Database, name: &str, fresh: String) -> Result<String, MongoError> {
    let c = coll(db, "meta");
    let id = format!("secret.{name}");
    c.update_one(doc! {"_id": &id}, doc! {"$setOnInsert": {"value": fresh}})
        .upsert(true)
        .await?;
    let d = c.find_one(doc! {"_id": &id}).await?;
    Ok(d.and_then(|d| d.get_str("value").ok().map(str::to_owned))
        .unwrap_or_default())
}

/// Adds `batch`, drained rush statistics, to the stored ones. On an error `batch` keeps
/// exactly the rows not sent (a command whose answer was lost counts as not
/// sent: statistics are best effort, and such a retry adds twice).
pub async fn add_stats(db: &Database, batch: &mut StatsBatch) -> Result<(), MongoError> {
    send(
        db,
        "stats_outcome_ticks",
        &mut batch.outcomes,
        |(a, at_ms, label, n)| {
            upsert_inc(
                format!("{a}|{at_ms}|{label}"),
                doc! {"activity_id": &**a, "at_ms": at_ms, "outcome": label},
                "count",
                *n,
            )
        },
    )
    .await?;
    send(db, "stats_sources", &mut batch.sources, |(a, s, n)| {
        let (kind, key) = s.parts();
        upsert_inc(
            format!("{a}|{kind}|{key}"),
            doc! {"activity_id": &**a, "kind": kind, "source": &key},
            "requests",
            *n,
        )
    })
    .await?;
    send(db, "stats_latency", &mut batch.latency, |(a, bound, n)| {
        let bound = if bound.is_finite() { *bound } else { -1.0 };
        upsert_inc(
            format!("{a}|{bound}"),
            doc! {"activity_id": &**a, "bound_ms": bound},
            "count",
            *n,
        )
    })
    .await
}

/// Sends one statement per row of `rows` to `collection` ([`increment`]);
/// on an error `rows` keeps exactly those not sent.
async fn send<T>(
    db: &Database,
    collection: &str,
    rows: &mut Vec<T>,
    statement: impl Fn(&T) -> Document,
) -> Result<(), MongoError> {
    let updates: Vec<Document> = rows.iter().map(statement).collect();
    let (sent, result) = increment(db, collection, &updates).await;
    rows.drain(..sent);
    result
}

/// One statement of an `update` command: upsert `_id`, set `fields`, add `n` to `counter`.
fn upsert_inc(id: String, fields: Document, counter: &str, n: u64) -> Document {
    doc! {"q": {"_id": id}, "u": {"$set": fields, "$inc": {counter: n as i64}}, "upsert": true}
}

/// Sends the statements as `update` commands of up to 1,000 each (one round
/// trip per thousand counters, not one per counter: a rush flushes
/// thousands of per-user counters every second). Returns how many were
/// sent, and the error that stopped the rest.
async fn increment(db: &Database, collection: &str, updates: &[Document]) -> (usize, Result<(), MongoError>) {
    let mut sent = 0;
    for chunk in updates.chunks(1000) {
        let reply = match db
            .run_command(doc! {"update": collection, "updates": chunk.to_vec(), "ordered": false})
            .await
        {
            Ok(reply) => reply,
            Err(error) => return (sent, Err(error)),
        };
        if let Ok(errors) = reply.get_array("writeErrors") {
            // Statistics are best effort; the claims never depend on them.
            tracing::warn!(
                collection,
                failed = errors.len(),
                "Some rush statistics were not stored."
            );
        }
        sent += chunk.len();
    }
    (sent, Ok(()))
}

fn int(d: &Document, key: &str) -> i64 {
    match d.get(key) {
        Some(Bson::Int64(v)) => *v,
        Some(Bson::Int32(v)) => i64::from(*v),
        Some(Bson::Double(v)) => *v as i64,
        _ => 0,
    }
}

fn text(d: &Document, key: &str) -> String {
    d.get_str(key).unwrap_or_default().to_owned()
}

/// Whether MongoDB knows `activity`.
pub async fn has_activity(db: &Database, activity: &str) -> Result<bool, MongoError> {
    Ok(coll(db, "activities").find_one(doc! {"_id": activity}).await?.is_some())
}

/// Up to `limit` claims of `activity` after `after` (in the export's order:
/// by time, then claim id), joined with their users. An export reads page
/// by page, each a query of its own: a client that reads slowly holds no
/// cursor open (MongoDB drops one idle for ten minutes).
pub async fn export_page(
    db: &Database,
    activity: &str,
    after: Option<(i64, i64)>,
    limit: i64,
) -> Result<Vec<ClaimRow>, MongoError> {
    let filter = match after {
        None => doc! {"activity_id": activity},
        Some((at, id)) => doc! {
            "activity_id": activity,
            "$or": [{"claimed_at_ms": {"$gt": at}}, {"claimed_at_ms": at, "claim_id": {"$gt": id}}],
        },
    };
    let page: Vec<Document> = coll(db, "claims")
        .find(filter)
        .sort(doc! {"claimed_at_ms": 1, "claim_id": 1})
        .limit(limit)
        .await?
        .try_collect()
        .await?;
    let ids: Vec<i64> = page.iter().map(|d| int(d, "user_id")).collect();
    let mut names: HashMap<i64, (String, String)> = HashMap::new();
    let mut found = coll(db, "users")
        .find(doc! {"_id": {"$in": ids}})
        .projection(doc! {"username": 1, "nickname": 1})
        .await?;
    while let Some(u) = found.try_next().await? {
        names.insert(int(&u, "_id"), (text(&u, "username"), text(&u, "nickname")));
    }
    Ok(page
        .iter()
        .map(|d| {
            let user_id = int(d, "user_id");
            let (username, nickname) = names.get(&user_id).cloned().unwrap_or_default();
            ClaimRow {
                claim_id: int(d, "claim_id") as u64,
                activity_id: text(d, "activity_id"),
                ticket_id: text(d, "ticket_id"),
                code: text(d, "code"),
                user_id: user_id as u64,
                username,
                nickname,
                claimed_at_ms: int(d, "claimed_at_ms"),
                node: text(d, "node"),
            }
        })
        .collect())
}

/// `user`'s claims in every activity but `served`: those no node sells any
/// more (retired, or taken out of the nodes' config), whose claims MongoDB
/// keeps once the backlogs have drained.
pub async fn claims_of_user_outside(db: &Database, user: u64, served: &[Arc<str>]) -> Result<Vec<Claim>, MongoError> {
    let served: Vec<&str> = served.iter().map(|a| &**a).collect();
    let mut found = coll(db, "claims")
        .find(doc! {"user_id": user as i64, "activity_id": {"$nin": served}})
        .await?;
    let mut out = Vec::new();
    while let Some(d) = found.try_next().await? {
        out.push(Claim {
            id: int(&d, "claim_id") as u64,
            activity_id: text(&d, "activity_id").into(),
            ticket_id: text(&d, "ticket_id").into(),
            code: text(&d, "code").into(),
            user_id: user,
            claimed_at_ms: int(&d, "claimed_at_ms"),
            idempotency_key: d.get_str("idempotency_key").ok().map(Arc::from),
        });
    }
    Ok(out)
}

/// How many claims of `activity` MongoDB holds.
pub async fn claims_of_activity(db: &Database, activity: &str) -> Result<u64, MongoError> {
    coll(db, "claims").count_documents(doc! {"activity_id": activity}).await
}

/// Claims of `activity` kept in `claim_conflicts` ([`insert_claims`]).
pub async fn conflicts_of_activity(db: &Database, activity: &str) -> Result<u64, MongoError> {
    coll(db, "claim_conflicts")
        .count_documents(doc! {"activity_id": activity})
        .await
}

/// What the report shows about `activity`, computed from the claims and the
/// recorded statistics.
pub async fn report_data(db: &Database, activity: &str, top: usize) -> Result<ReportData, MongoError> {
    let mut data = ReportData::default();
    if let Some(a) = coll(db, "activities").find_one(doc! {"_id": activity}).await? {
        data.activity = Some((
            text(&a, "name"),
            int(&a, "start_ms"),
            int(&a, "end_ms"),
            int(&a, "per_user_limit") as u32,
        ));
    }
    let mut per_ticket: HashMap<String, (u64, Option<i64>, Option<i64>)> = HashMap::new();
    let mut per_10ms: BTreeMap<i64, u64> = BTreeMap::new();
    let mut nodes: BTreeMap<String, u64> = BTreeMap::new();
    let mut users: HashMap<i64, u64> = HashMap::new();
    let mut cursor = coll(db, "claims")
        .find(doc! {"activity_id": activity})
        .projection(doc! {"ticket_id": 1, "claimed_at_ms": 1, "node": 1, "user_id": 1})
        .await?;
    while let Some(d) = cursor.try_next().await? {
        let ms = int(&d, "claimed_at_ms");
        let t = per_ticket.entry(text(&d, "ticket_id")).or_default();
        t.0 += 1;
        t.1 = Some(t.1.map_or(ms, |v| v.min(ms)));
        t.2 = Some(t.2.map_or(ms, |v| v.max(ms)));
        *per_10ms.entry(ms.div_euclid(10)).or_default() += 1;
        *nodes.entry(text(&d, "node")).or_default() += 1;
        *users.entry(int(&d, "user_id")).or_default() += 1;
    }
    data.claims_per_10ms = per_10ms.into_iter().collect();
    data.nodes = nodes.into_iter().collect();
    data.users = users.len() as u64;
    data.most_per_user = users.values().copied().max().unwrap_or(0);
    let codes = coll(db, "codes");
    let mut tickets = coll(db, "tickets").find(doc! {"activity_id": activity}).await?;
    while let Some(t) = tickets.try_next().await? {
        let id = text(&t, "_id");
        let (claimed, first_ms, last_ms) = per_ticket.get(&id).copied().unwrap_or_default();
        data.tickets.push(TicketReport {
            codes: codes.count_documents(doc! {"ticket_id": &id}).await?,
            name: text(&t, "name"),
            id,
            claimed,
            first_ms,
            last_ms,
        });
    }
    // Per tick, summed as it streams in steps the span allows (see
    // `stats::outcome_resolution_ms`); `stats_outcomes` holds what earlier
    // versions wrote, per minute.
    // The resolution fits the rush window's rows, which the report charts:
    // one refused request weeks early read the whole sale per minute.
    let ticks = coll(db, "stats_outcome_ticks");
    let window = data
        .activity
        .as_ref()
        .map_or(i64::MIN..i64::MAX, |a| crate::stats::rush_window(a.1));
    let edge = |order: i32| {
        let (ticks, window) = (ticks.clone(), window.clone());
        async move {
            let first = ticks
                .find_one(doc! {"activity_id": activity, "at_ms": {"$gte": window.start, "$lt": window.end}})
                .sort(doc! {"at_ms": order})
                .await?;
            Ok::<_, MongoError>(first.map(|d| int(&d, "at_ms")))
        }
    };
    let span = match (edge(1).await?, edge(-1).await?) {
        (Some(first), Some(last)) => last - first,
        _ => 0,
    };
    let step = crate::stats::outcome_resolution_ms(span);
    let mut summed: std::collections::BTreeMap<(i64, String), u64> = std::collections::BTreeMap::new();
    let mut outcomes = ticks.find(doc! {"activity_id": activity}).await?;
    while let Some(d) = outcomes.try_next().await? {
        let at = int(&d, "at_ms").div_euclid(step) * step;
        *summed.entry((at, text(&d, "outcome"))).or_default() += int(&d, "count") as u64;
    }
    let mut outcomes = coll(db, "stats_outcomes").find(doc! {"activity_id": activity}).await?;
    while let Some(d) = outcomes.try_next().await? {
        let at = int(&d, "minute").saturating_mul(60_000).div_euclid(step) * step;
        *summed.entry((at, text(&d, "outcome"))).or_default() += int(&d, "count") as u64;
    }
    data.outcomes = summed.into_iter().map(|((at, outcome), n)| (at, outcome, n)).collect();
    let mut latency = coll(db, "stats_latency").find(doc! {"activity_id": activity}).await?;
    while let Some(d) = latency.try_next().await? {
        let bound = d.get_f64("bound_ms").unwrap_or(-1.0);
        let bound = if bound < 0.0 { f64::INFINITY } else { bound };
        data.latency.push((bound, int(&d, "count") as u64));
    }
    data.latency.sort_by(|a, b| a.0.total_cmp(&b.0));
    // The top of each kind, as the embedded report ranks them: sorted and
    // cut by MongoDB, not every source of a rush (one per fan) read here;
    // and `other` (sources past `stats::MAX_SOURCES`) is neither an address
    // nor an account. No rankings asked for (the rejections export) reads
    // none: MongoDB takes a limit of 0 as no limit, and read every fan's
    // row and every fan's account.
    let top_of = |kind: &'static str| async move {
        let mut rows = Vec::new();
        if top == 0 {
            return Ok(rows);
        }
        let mut found = coll(db, "stats_sources")
            .find(doc! {"activity_id": activity, "kind": kind})
            .sort(doc! {"requests": -1, "source": 1})
            .limit(i64::try_from(top).unwrap_or(i64::MAX))
            .await?;
        while let Some(d) = found.try_next().await? {
            rows.push((text(&d, "source"), int(&d, "requests") as u64));
        }
        Ok::<_, MongoError>(rows)
    };
    let ips = top_of("ip").await?;
    let by_user = top_of("user").await?;
    let ids: Vec<i64> = by_user.iter().filter_map(|(s, _)| s.parse().ok()).collect();
    let mut names = HashMap::new();
    let mut found = coll(db, "users")
        .find(doc! {"_id": {"$in": ids}})
        .projection(doc! {"username": 1})
        .await?;
    while let Some(u) = found.try_next().await? {
        names.insert(int(&u, "_id").to_string(), text(&u, "username"));
    }
    data.top_ips = ips;
    let mut unranked = coll(db, "stats_sources")
        .find(doc! {"activity_id": activity, "kind": "other"})
        .await?;
    while let Some(d) = unranked.try_next().await? {
        data.unranked_ip_requests += int(&d, "requests") as u64;
    }
    data.top_users = by_user
        .into_iter()
        .map(|(id, n)| (names.get(&id).cloned().unwrap_or_else(|| format!("#{id}")), n))
        .collect();
    Ok(data)
}

/// Every activity MongoDB knows, for `ticketd verify`: `(id, per-user
/// limit, its ticket ids)`, by id.
pub async fn activity_shapes(db: &Database) -> Result<Vec<(String, u32, Vec<String>)>, MongoError> {
    let mut tickets: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut cursor = coll(db, "tickets").find(doc! {}).sort(doc! {"_id": 1}).await?;
    while let Some(d) = cursor.try_next().await? {
        tickets
            .entry(text(&d, "activity_id"))
            .or_default()
            .push(text(&d, "_id"));
    }
    let mut out = Vec::new();
    let mut cursor = coll(db, "activities").find(doc! {}).sort(doc! {"_id": 1}).await?;
    while let Some(d) = cursor.try_next().await? {
        let id = text(&d, "_id");
        let limit = d.get_i64("per_user_limit").unwrap_or(1).clamp(0, i64::from(u32::MAX)) as u32;
        let t = tickets.remove(&id).unwrap_or_default();
        out.push((id, limit, t));
    }
    Ok(out)
}

/// The codes MongoDB holds for `ticket`.
pub async fn codes_of_ticket(db: &Database, ticket: &str) -> Result<HashSet<String>, MongoError> {
    let mut out = HashSet::new();
    let mut cursor = coll(db, "codes")
        .find(doc! {"ticket_id": ticket})
        .projection(doc! {"_id": 1})
        .await?;
    while let Some(d) = cursor.try_next().await? {
        out.insert(text(&d, "_id"));
    }
    Ok(out)
}

/// The claims MongoDB holds for `activity`: code -> user id.
pub async fn claim_owners(db: &Database, activity: &str) -> Result<HashMap<String, u64>, MongoError> {
    let mut out = HashMap::new();
    let mut cursor = coll(db, "claims")
        .find(doc! {"activity_id": activity})
        .projection(doc! {"_id": 1, "user_id": 1})
        .await?;
    while let Some(d) = cursor.try_next().await? {
        out.insert(text(&d, "_id"), d.get_i64("user_id").unwrap_or(-1) as u64);
    }
    Ok(out)
}
