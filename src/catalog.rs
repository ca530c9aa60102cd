//! The catalog: an immutable snapshot of activities and ticket types.
//!
//! Request handlers read it through [`SharedCatalog`] (an `ArcSwap`) without
//! taking a lock. A reload builds a whole new [`Catalog`] from the new config
//! and swaps it in; requests that already hold the old snapshot finish on it.
//! Snapshots do not own stock: each ticket type and activity points at its
//! long-lived [`CodePool`] and [`Ledger`] in the [`Inventory`], so swapping a
//! snapshot never changes what is in stock or who holds what.

use std::{collections::HashMap, sync::Arc};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::{
    admission::{Opened, Past, Room, RoomSettings, Rooms},
    clock::now_ms,
    config::Config,
    inventory::{CodePool, Inventory, Ledger},
    vocab::Rejection,
};

/// The catalog in use, swapped atomically on reload.
pub type SharedCatalog = ArcSwap<Catalog>;

/// One consistent view of everything on sale.
pub struct Catalog {
    activities: Vec<Arc<Activity>>,
    by_id: HashMap<Arc<str>, usize>,
    /// The last `/act/list` rendering of this snapshot (see [`Listing`]).
    listing: ArcSwapOption<Listing>,
    /// Activities whose rooms this build opened (none had one before): a
    /// snapshot refused after its build forgets them ([`Catalog::abandon`]).
    opened_rooms: Vec<Arc<str>>,
}

/// A rendering of the catalog (the `/act/list` activities, as JSON) and the
/// fingerprint of everything it shows that can change without a reload —
/// each activity's status and paused flag, its stock counts. The snapshot
/// carries it so that a rendering is reused exactly while it is still
/// true: before a sale opens, when thousands of fans refresh the list, it
/// is built once; a reload brings a new snapshot and so a new rendering.
pub struct Listing {
    /// What the rendering shows that may change.
    pub fingerprint: u64,
    /// The rendering.
    pub json: bytes::Bytes,
}

/// An activity (活动) with its times resolved to Unix milliseconds.
pub struct Activity {
    /// `actId`.
    pub id: Arc<str>,
    /// Display name.
    pub name: String,
    /// Description.
    pub desc: String,
    /// Image URL.
    pub image: String,
    /// Claiming opens, Unix ms.
    pub start_ms: i64,
    /// Claiming closes, Unix ms.
    pub end_ms: i64,
    /// Most codes per user.
    pub per_user_limit: u32,
    /// Claims are refused while paused.
    pub paused: bool,
    /// Proof-of-work bits per claim token (0 = off).
    pub pow_difficulty: u8,
    /// Only accounts made before this time take part (`min_account_age`
    /// before the start), Unix ms; `None`: any account.
    pub accounts_before_ms: Option<i64>,
    /// Ticket types, in config order.
    pub tickets: Vec<TicketType>,
    /// Who holds what (lives across reloads).
    pub ledger: Arc<Ledger>,
    /// The waiting room, for `admission = "queue"` or `"lottery"` (lives
    /// across reloads): claims then need its pass.
    pub room: Option<Arc<Room>>,
    /// The room's settings in this snapshot, applied to the room once the
    /// snapshot is in use ([`Catalog::apply_rooms`]).
    pub room_settings: Option<RoomSettings>,
}

/// A ticket type (票).
pub struct TicketType {
    /// `ticketId`.
    pub id: Arc<str>,
    /// Display name.
    pub name: String,
    /// Description.
    pub desc: String,
    /// Start of the ticket's own validity, Unix ms.
    pub valid_from_ms: Option<i64>,
    /// End of the ticket's own validity, Unix ms.
    pub valid_until_ms: Option<i64>,
    /// The unclaimed codes (lives across reloads).
    pub pool: Arc<CodePool>,
}

/// Where an activity is in its sale window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Before the start.
    Upcoming,
    /// Claims are accepted (unless paused).
    Open,
    /// After the end.
    Ended,
}

/// What [`Catalog::build`] finds wrong with `config`'s times once relative
/// ones are resolved against `node_start_ms` (the config's validation can
/// compare only times of one kind): `ticketd check-config` asks it as of a
/// node starting now.
pub fn time_problems(config: &Config, node_start_ms: i64) -> Vec<String> {
    let mut problems = Vec::new();
    for a in &config.activities {
        if a.end_time.resolve(node_start_ms) <= a.start_time.resolve(node_start_ms) {
            problems.push(format!("activity `{}` must end after it starts", a.id));
        }
        if RoomSettings::of(a, node_start_ms).is_some_and(|s| !s.in_order()) {
            problems.push(format!(
                "activity `{}`: queue_opens must come before draw_time, and draw_time not after start_time",
                a.id
            ));
        }
    }
    problems
}

impl Catalog {
    /// Builds a snapshot of `config`, resolving relative times against
    /// `node_start_ms` and attaching the inventory's pools and ledgers and
    /// the activities' waiting rooms. A room that has opened keeps its mode
    /// and times: a config that changes them is refused.
    pub fn build(
        config: &Config,
        node_start_ms: i64,
        inventory: &Inventory,
        rooms: &Rooms,
    ) -> Result<Catalog, Vec<String>> {
        let mut problems = time_problems(config, node_start_ms);
        let now = now_ms();
        let mut room_settings = Vec::with_capacity(config.activities.len());
        for a in &config.activities {
            let settings = RoomSettings::of(a, node_start_ms);
            let open_room = rooms.get(&a.id);
            match (&settings, &open_room) {
                // Out of order: said by `time_problems`.
                (Some(s), _) if !s.in_order() => {}
                (new, Some(room)) => problems.extend(room.settings().refused_change(&a.id, new.as_ref(), now)),
                // A restart, or a node whose config never had the room:
                // the room's log is asked instead.
                (None, None) => match rooms.past(&a.id) {
                    Ok(Past::Untouched) => {}
                    Ok(Past::Drawn(drawn)) => problems.push(format!(
                        "activity `{}`: its waiting room drew its order as a {drawn}; a drawn room's admission \
                         cannot change (set admission = \"{drawn}\" and its queue_opens back)",
                        a.id
                    )),
                    Ok(Past::Opened) => problems.push(format!(
                        "activity `{}`: its waiting room has opened (its log records joins or a draw); admission cannot \
                         change once its queue has opened (set admission and queue_opens back)",
                        a.id
                    )),
                    // Not refused: Redis away must not block a reload. The
                    // commit script refuses a pass-less claim in an opened
                    // room whatever this node's config says.
                    Err(e) => tracing::warn!(
                        activity = %a.id,
                        error = %e,
                        "Cannot tell whether the activity's waiting room has opened or drew its order (an opened room keeps its admission)."
                    ),
                },
                _ => {}
            }
            room_settings.push(settings);
        }
        let mut activities = Vec::with_capacity(config.activities.len());
        let mut by_id = HashMap::with_capacity(config.activities.len());
        for a in &config.activities {
            let (start_ms, end_ms) = (a.start_time.resolve(node_start_ms), a.end_time.resolve(node_start_ms));
            let tickets = a
                .tickets
                .iter()
                .map(|t| TicketType {
                    id: Arc::from(t.id.as_str()),
                    name: t.name.clone(),
                    desc: t.desc.clone(),
                    valid_from_ms: t.start_time.map(|s| s.resolve(node_start_ms)),
                    valid_until_ms: t.end_time.map(|s| s.resolve(node_start_ms)),
                    pool: inventory.pool(&t.id),
                })
                .collect();
            let id: Arc<str> = Arc::from(a.id.as_str());
            by_id.insert(id.clone(), activities.len());
            activities.push(Arc::new(Activity {
                ledger: inventory.ledger(&a.id),
                id,
                name: a.name.clone(),
                desc: a.desc.clone(),
                image: a.image.clone(),
                start_ms,
                end_ms,
                per_user_limit: a.per_user_limit,
                paused: a.paused,
                pow_difficulty: a.pow_difficulty,
                accounts_before_ms: a
                    .min_account_age
                    .map(|age| start_ms.saturating_sub(i64::try_from(age.0.as_millis()).unwrap_or(i64::MAX))),
                tickets,
                room: None,
                room_settings: None,
            }));
        }
        let mut opened_rooms = Vec::new();
        if problems.is_empty() {
            for (activity, settings) in activities.iter_mut().zip(room_settings) {
                let Some(settings) = settings else { continue };
                match rooms.room(&activity.id, settings.clone()) {
                    Ok((room, opened)) => {
                        if opened == Opened::Now {
                            opened_rooms.push(activity.id.clone());
                        }
                        let activity = Arc::get_mut(activity).expect("not shared yet");
                        activity.room = Some(room);
                        activity.room_settings = Some(settings);
                    }
                    Err(e) => problems.push(format!("activity `{}`: cannot open its waiting room: {e}", activity.id)),
                }
            }
        }
        if problems.is_empty() {
            Ok(Catalog {
                activities,
                by_id,
                listing: ArcSwapOption::empty(),
                opened_rooms,
            })
        } else {
            for activity in opened_rooms {
                rooms.forget(&activity);
            }
            Err(problems)
        }
    }

    /// For a snapshot that will never serve (its reload was refused after
    /// the build): forgets the rooms its build opened. Kept, such a room
    /// would hold the refused config's queue settings, and once its
    /// `queue_opens` had passed, every later reload would be refused for
    /// changing a queue nobody ever saw.
    pub fn abandon(self, rooms: &Rooms) {
        for activity in &self.opened_rooms {
            rooms.forget(activity);
        }
    }

    /// Puts this snapshot's room settings into effect — called once it is
    /// the snapshot in use, so a reload refused after the build changes no
    /// room — and forgets the rooms of activities that are no longer queues
    /// and never opened (an opened room cannot be switched off: the build
    /// refuses that).
    pub fn apply_rooms(&self, rooms: &Rooms) {
        for a in &self.activities {
            if let (Some(room), Some(settings)) = (&a.room, &a.room_settings) {
                room.apply(settings.clone());
            }
        }
        let now = now_ms();
        for room in rooms.all() {
            let still = self.activity(&room.activity).is_some_and(|a| a.room.is_some());
            if !still && now < room.settings().opens_ms {
                rooms.forget(&room.activity);
            }
        }
    }

    /// The last rendering stored with [`Catalog::keep_listing`], if any.
    pub fn listing(&self) -> Option<Arc<Listing>> {
        self.listing.load_full()
    }

    /// Keeps `listing` for the next requests on this snapshot.
    pub fn keep_listing(&self, listing: Listing) {
        self.listing.store(Some(Arc::new(listing)));
    }

    /// The activity with `id`.
    pub fn activity(&self, id: &str) -> Option<&Arc<Activity>> {
        self.by_id.get(id).map(|&i| &self.activities[i])
    }

    /// Every activity, in config order.
    pub fn activities(&self) -> &[Arc<Activity>] {
        &self.activities
    }
}

impl Activity {
    /// The ticket type with `id` in this activity.
    pub fn ticket(&self, id: &str) -> Option<&TicketType> {
        self.tickets.iter().find(|t| &*t.id == id)
    }

    /// Whether an account made at `account_created_ms` (as its session
    /// says; `None` when the token is older than that field) may take part.
    pub fn admits_account(&self, account_created_ms: Option<i64>) -> Result<(), Rejection> {
        let Some(accounts_before_ms) = self.accounts_before_ms else {
            return Ok(());
        };
        match account_created_ms {
            None => Err(Rejection::SessionPredatesAccountAge),
            Some(made) if made < accounts_before_ms => Ok(()),
            Some(_) => Err(Rejection::AccountTooNew { accounts_before_ms }),
        }
    }

    /// Where the activity is at `now_ms`.
    pub fn status(&self, now_ms: i64) -> Status {
        if now_ms < self.start_ms {
            Status::Upcoming
        } else if now_ms < self.end_ms {
            Status::Open
        } else {
            Status::Ended
        }
    }

    /// Codes in stock across all ticket types.
    pub fn remaining(&self) -> usize {
        self.tickets.iter().map(|t| t.pool.remaining()).sum()
    }
}
