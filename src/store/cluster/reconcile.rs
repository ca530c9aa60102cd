//! `ticketd verify` in cluster mode: the invariants of the shared stock,
//! checked in Redis (one atomic snapshot per activity) and against MongoDB.
//!
//! Per ticket type, the master list, the lease sets and the claimed hash
//! must partition the codes ever pushed (`known`): each code in exactly one
//! of them, none lost, none unknown — and MongoDB must hold the same codes.
//! Per user, the limit counter and the list of held codes must match the
//! claims, and nobody may be over the limit (the higher of MongoDB's, as the
//! last import wrote it, and the highest a claim was committed under: a
//! reload may have raised it, an import lowered it). The per-ticket sold counters
//! must match the claims. Redis's claims must equal MongoDB's, except those
//! still in a node's backlog (on their way), and MongoDB must hold no claim
//! Redis does not. It may run while nodes serve: each activity's Redis side
//! is read in one atomic script.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::{error::ClusterError, mongo, record::Record, scripts, shared::Shared};
use crate::store::types::Reconciliation;

/// One activity's snapshot, as [`scripts::SNAPSHOT`] returns it.
type Snapshot = (
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<String>,
    Vec<Vec<String>>,
    Vec<(Vec<String>, Vec<String>, Vec<Vec<String>>)>,
    Option<u32>,
);

/// Checks every activity MongoDB knows.
pub(super) async fn reconcile(shared: &Shared) -> Result<Reconciliation, ClusterError> {
    let mut r = Reconciliation::default();
    for (activity, limit, tickets) in mongo::activity_shapes(&shared.db).await? {
        check_activity(shared, &activity, limit, &tickets, &mut r).await?;
    }
    Ok(r)
}

async fn check_activity(
    shared: &Shared,
    activity: &str,
    limit: u32,
    tickets: &[String],
    r: &mut Reconciliation,
) -> Result<(), ClusterError> {
    let keys = scripts::Keys::new(activity);
    let mut redis = shared.redis.clone();
    // MongoDB is read before and after the snapshot, so that nodes still
    // draining their backlogs cannot make a claim look missing: one in
    // MongoDB before is in Redis at the snapshot (claims never leave it),
    // and one committed by the snapshot is in a backlog then or in MongoDB
    // after.
    let stored_before = mongo::claim_owners(&shared.db, activity).await?;
    let (nodes, claimed, users, held, sold, backlogs, per_ticket, served): Snapshot = scripts::SNAPSHOT
        .key(keys.nodes())
        .arg(keys.prefix())
        .arg(tickets)
        .invoke_async(&mut redis)
        .await?;
    let at = |what: String| format!("activity `{activity}`: {what}");
    let limit = limit.max(served.unwrap_or(0));

    let mut claims: BTreeMap<String, Record> = BTreeMap::new();
    for (code, json) in pairs(&claimed) {
        match Record::parse(activity, json) {
            Ok(rec) if rec.code == code => {
                claims.insert(code.to_owned(), rec);
            }
            _ => r
                .problems
                .push(at(format!("the claim record of code `{code}` is unreadable: {json}"))),
        }
    }

    // Codes: each known code in exactly one place, and MongoDB agrees.
    let mut on_lists = 0;
    let mut leased = 0;
    for (ticket, (known, stock, leases)) in tickets.iter().zip(&per_ticket) {
        let known: HashSet<&str> = known.iter().map(String::as_str).collect();
        let mut places: HashMap<&str, Vec<String>> = HashMap::new();
        for code in stock {
            places.entry(code).or_default().push("the master list".into());
        }
        for (node, set) in nodes.iter().zip(leases) {
            for code in set {
                places.entry(code).or_default().push(format!("node {node}'s lease"));
            }
        }
        for (code, rec) in claims.iter().filter(|(_, rec)| rec.ticket == *ticket) {
            places
                .entry(code)
                .or_default()
                .push(format!("claimed by user {}", rec.user));
        }
        on_lists += stock.len();
        leased += leases.iter().map(Vec::len).sum::<usize>();
        let mut twice: Vec<_> = places.iter().filter(|(_, p)| p.len() > 1).collect();
        twice.sort();
        for (code, p) in twice {
            r.problems
                .push(at(format!("code `{code}` of `{ticket}` is in {}", p.join(" and "))));
        }
        let mut unknown: Vec<&&str> = places.keys().filter(|c| !known.contains(**c)).collect();
        unknown.sort();
        for code in unknown {
            r.problems.push(at(format!(
                "code `{code}` of `{ticket}` was never pushed (not in its known set)"
            )));
        }
        let mut lost: Vec<&&str> = known.iter().filter(|c| !places.contains_key(**c)).collect();
        lost.sort();
        for code in lost {
            r.problems.push(at(format!(
                "code `{code}` of `{ticket}` is lost: on no master list, in no lease, not claimed"
            )));
        }
        let sold_here = claims.values().filter(|rec| rec.ticket == *ticket).count();
        let counted = pairs(&sold)
            .find(|(t, _)| t == ticket)
            .and_then(|(_, n)| n.parse::<usize>().ok())
            .unwrap_or(0);
        if counted != sold_here {
            r.problems.push(at(format!(
                "ticket `{ticket}`'s sold counter says {counted}, but {sold_here} of its codes are claimed"
            )));
        }
        let in_mongo = mongo::codes_of_ticket(&shared.db, ticket).await?;
        let mut only_redis: Vec<&&str> = known.iter().filter(|c| !in_mongo.contains(**c)).collect();
        only_redis.sort();
        for code in only_redis {
            r.problems.push(at(format!(
                "code `{code}` of `{ticket}` is in Redis but not in MongoDB's codes"
            )));
        }
        let mut only_mongo: Vec<&String> = in_mongo.iter().filter(|c| !known.contains(c.as_str())).collect();
        only_mongo.sort();
        for code in only_mongo {
            r.problems.push(at(format!(
                "code `{code}` of `{ticket}` is in MongoDB but was never pushed to Redis (run `ticketd import`)"
            )));
        }
    }
    for (code, rec) in &claims {
        if !tickets.contains(&rec.ticket) {
            r.problems.push(at(format!(
                "code `{code}` is claimed as ticket `{}`, which is not this activity's",
                rec.ticket
            )));
        }
    }

    // Users: counters and held lists match the claims; nobody over the limit.
    let mut by_user: BTreeMap<u64, BTreeSet<&str>> = BTreeMap::new();
    for (code, rec) in &claims {
        by_user.entry(rec.user).or_default().insert(code);
    }
    let counters: HashMap<&str, &str> = pairs(&users).collect();
    let lists: HashMap<&str, &str> = pairs(&held).collect();
    let mut all_users: BTreeSet<u64> = by_user.keys().copied().collect();
    all_users.extend(
        counters
            .keys()
            .chain(lists.keys())
            .filter_map(|u| u.parse::<u64>().ok()),
    );
    for user in all_users {
        let mine = by_user.get(&user).cloned().unwrap_or_default();
        let key = user.to_string();
        let counter = counters
            .get(key.as_str())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        if counter != mine.len() {
            r.problems.push(at(format!(
                "user {user}'s claim counter says {counter}, but the user holds {} codes",
                mine.len()
            )));
        }
        let listed: BTreeSet<String> = lists
            .get(key.as_str())
            .and_then(|json| serde_json::from_str::<Vec<String>>(json).ok())
            .unwrap_or_default()
            .into_iter()
            .collect();
        if listed.iter().map(String::as_str).collect::<BTreeSet<_>>() != mine {
            r.problems.push(at(format!(
                "user {user}'s held list is {listed:?}, but the user's claims are {mine:?}"
            )));
        }
        if mine.len() > limit as usize {
            r.problems.push(at(format!(
                "user {user} holds {} codes, over the limit of {limit}",
                mine.len()
            )));
        }
    }

    // MongoDB: every claim Redis holds, except those still on their way.
    let in_backlog: HashSet<&str> = backlogs.iter().flatten().map(String::as_str).collect();
    let stored = mongo::claim_owners(&shared.db, activity).await?;
    let mut only_mongo: Vec<&String> = stored_before.keys().filter(|c| !claims.contains_key(*c)).collect();
    for (code, rec) in &claims {
        match stored.get(code) {
            Some(&user) if user == rec.user => {}
            Some(&user) => r.problems.push(at(format!(
                "code `{code}` is claimed by user {} in Redis but by user {user} in MongoDB",
                rec.user
            ))),
            None if in_backlog.contains(code.as_str()) => {}
            None => r.problems.push(at(format!(
                "claim of code `{code}` (user {}) is in Redis but neither in MongoDB nor in any backlog",
                rec.user
            ))),
        }
    }
    only_mongo.sort();
    for code in only_mongo {
        r.problems.push(at(format!(
            "MongoDB holds a claim of code `{code}` (user {}) that Redis does not",
            stored_before[code]
        )));
    }
    for code in &in_backlog {
        if !claims.contains_key(*code) {
            r.problems.push(at(format!(
                "a backlog holds a claim of code `{code}` that Redis does not"
            )));
        }
    }

    // Kept apart by the writer: a second acknowledged claim of a code (or of
    // a user's nth claim). Two users were told they hold one code.
    let conflicts = mongo::conflicts_of_activity(&shared.db, activity).await?;
    if conflicts > 0 {
        r.problems.push(at(format!(
            "{conflicts} acknowledged claim(s) met another stored claim of their code (or of their user's claim \
             number) and are kept in MongoDB's claim_conflicts: both claims were answered success (Redis lost \
             writes it had acknowledged)"
        )));
    }

    let known: usize = per_ticket.iter().map(|t| t.0.len()).sum();
    r.summary.push(format!(
        "activity `{activity}`: {known} codes, {} claimed ({} in MongoDB, {} in backlogs), {on_lists} on master lists, {leased} leased to {} node(s), {} user(s)",
        claims.len(),
        stored.len(),
        in_backlog.len(),
        nodes.len(),
        by_user.len()
    ));
    Ok(())
}

/// The field/value pairs of an `HGETALL` answer.
fn pairs(flat: &[String]) -> impl Iterator<Item = (&str, &str)> {
    flat.chunks_exact(2).map(|p| (p[0].as_str(), p[1].as_str()))
}
