//! The decisions that make nodes form and heal one cluster on their own, as pure functions over
//! what gossip and Raft report: when a fresh node bootstraps a cluster, and how the leader changes
//! the voter set. No I/O, no clocks: callers pass durations in.

use std::collections::BTreeSet;
use std::time::Duration;

/// What one visible node (this node included) publishes about itself before it belongs to a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormingPeer {
    pub id: u64,
    /// The cluster it belongs to, if any.
    pub cluster: Option<String>,
    /// The node it backs to bootstrap the cluster (the smallest unformed id it sees).
    pub candidate: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Formation {
    /// Not enough nodes agree yet.
    Wait,
    /// A cluster exists among the visible nodes: wait to be admitted by its leader.
    Join,
    /// This node bootstraps the cluster.
    Bootstrap,
}

/// The node this one backs for bootstrap: the smallest id among visible nodes not yet in a cluster.
pub fn bootstrap_candidate(me: u64, peers: &[FormingPeer]) -> u64 {
    peers.iter().filter(|p| p.cluster.is_none()).map(|p| p.id).chain([me]).min().unwrap_or(me)
}

/// Decides whether a fresh node bootstraps. A node bootstraps only when at least `min_voters` live
/// unformed nodes (itself included) publish it as their candidate. Any two sets of `min_voters`
/// backers that gossip with a shared seed see each other, and each node backs one candidate at a
/// time, so one seed set never yields two clusters.
pub fn formation(me: u64, min_voters: usize, peers: &[FormingPeer]) -> Formation {
    if peers.iter().any(|p| p.cluster.is_some()) {
        return Formation::Join;
    }
    let backers = peers.iter().filter(|p| p.id != me && p.candidate == Some(me)).count() + 1;
    if bootstrap_candidate(me, peers) == me && backers >= min_voters.max(1) {
        Formation::Bootstrap
    } else {
        Formation::Wait
    }
}

/// How the leader sees one node when it plans voter changes.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberView {
    pub id: u64,
    /// Gossip reports it alive.
    pub live: bool,
    /// How long gossip has reported it dead (zero when live).
    pub dead_for: Duration,
    pub voter: bool,
    pub learner: bool,
    /// Its log is close enough to the leader's to vote without stalling commits.
    pub caught_up: bool,
    pub zone: Option<String>,
    pub free_vcpus: u64,
    pub free_mem_mib: u64,
    /// It is shutting down: it should not lead.
    pub stopping: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VoterChange {
    AddLearner(u64),
    Promote(u64),
    Remove(u64),
}

/// Voters wanted for a cluster of `nodes` healthy members: 5 from 7 up, else 3, else 1 (an even
/// count adds no fault tolerance).
pub fn target_voters(nodes: usize) -> usize {
    match nodes {
        n if n >= 7 => 5,
        n if n >= 3 => 3,
        _ => 1,
    }
}

/// The next membership change the leader should propose (one at a time), or none.
///
/// Order: admit new nodes as learners; replace voters dead longer than `dead_timeout` by promoting
/// the best caught-up learner, then remove them; promote learners while live voters are below
/// target; drop learners dead for twice the timeout (a returning node is admitted again).
pub fn plan_voters(members: &[MemberView], leader: u64, dead_timeout: Duration) -> Option<VoterChange> {
    if let Some(m) = members.iter().find(|m| m.live && !m.voter && !m.learner) {
        return Some(VoterChange::AddLearner(m.id));
    }
    let gone = |m: &MemberView| !m.live && m.dead_for >= dead_timeout && m.id != leader;
    // Sized by every node in the configuration, dead or alive: a voter that dies is replaced, not
    // written off by shrinking the target.
    let target = target_voters(members.iter().filter(|m| m.voter || m.learner).count());
    let voters: Vec<&MemberView> = members.iter().filter(|m| m.voter).collect();
    let healthy_voters = voters.iter().filter(|m| !gone(m)).count();

    if healthy_voters < target {
        let voter_zones: BTreeSet<&str> =
            voters.iter().filter(|v| !gone(v)).filter_map(|v| v.zone.as_deref()).collect();
        let best = members.iter().filter(|m| m.learner && m.live && m.caught_up && !m.stopping).max_by_key(|m| {
            let new_zone = m.zone.as_deref().is_some_and(|z| !voter_zones.contains(z));
            (new_zone, m.free_mem_mib, m.free_vcpus, std::cmp::Reverse(m.id))
        });
        if let Some(m) = best {
            return Some(VoterChange::Promote(m.id));
        }
    }
    // Remove a dead voter only once a replacement has taken its seat.
    if voters.len() > target {
        if let Some(m) = voters.iter().find(|m| gone(m)) {
            return Some(VoterChange::Remove(m.id));
        }
    }
    members.iter().find(|m| m.learner && !m.live && m.dead_for >= dead_timeout * 2).map(|m| VoterChange::Remove(m.id))
}

/// The voter the leader should hand leadership to, if any: a live, caught-up voter with clearly
/// more free memory (a quarter more and 256 MiB more), so leadership settles on the node with the
/// most room without flapping between similar ones. Nodes shutting down never get it, and a
/// leader that is shutting down gives it to any voter that can take it.
pub fn preferred_leader(members: &[MemberView], leader: u64) -> Option<u64> {
    let me = members.iter().find(|m| m.id == leader)?;
    let own = me.free_mem_mib;
    // A leader that is shutting down hands over to any voter that can lead, room or not.
    let roomier = |m: &&MemberView| {
        me.stopping || (m.free_mem_mib > own.saturating_add(own / 4) && m.free_mem_mib > own.saturating_add(256))
    };
    members
        .iter()
        .filter(|m| m.voter && m.live && m.caught_up && m.id != leader && !m.stopping)
        .filter(roomier)
        .max_by_key(|m| (m.free_mem_mib, m.free_vcpus, std::cmp::Reverse(m.id)))
        .map(|m| m.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(id: u64, candidate: Option<u64>) -> FormingPeer {
        FormingPeer { id, cluster: None, candidate }
    }

    #[test]
    fn the_smallest_node_bootstraps_once_enough_nodes_back_it() {
        // Node 1 sees 2 and 3, but they have not chosen it yet.
        let peers = [fresh(1, Some(1)), fresh(2, None), fresh(3, Some(3))];
        assert_eq!(formation(1, 3, &peers), Formation::Wait);
        let peers = [fresh(1, Some(1)), fresh(2, Some(1)), fresh(3, Some(1))];
        assert_eq!(formation(1, 3, &peers), Formation::Bootstrap);
        // The others never bootstrap while they see a smaller node.
        assert_eq!(formation(2, 3, &peers), Formation::Wait);
        assert_eq!(bootstrap_candidate(3, &peers), 1);
    }

    #[test]
    fn a_visible_cluster_means_join_and_one_node_needs_only_itself_when_allowed() {
        let peers = [fresh(5, Some(5)), FormingPeer { id: 9, cluster: Some("c".into()), candidate: None }];
        assert_eq!(formation(5, 1, &peers), Formation::Join);
        assert_eq!(formation(5, 1, &[fresh(5, Some(5))]), Formation::Bootstrap);
        assert_eq!(formation(5, 3, &[fresh(5, Some(5))]), Formation::Wait);
    }

    #[test]
    fn two_disjoint_views_cannot_both_reach_min_voters() {
        // Six nodes, every possible pair of candidates: at most one gets three backers when each
        // node backs exactly one candidate.
        let backs = [1u64, 1, 1, 4, 4, 6];
        let peers: Vec<_> = (1..=6).map(|id| fresh(id, Some(backs[id as usize - 1]))).collect();
        let bootstrappers: Vec<u64> = (1..=6).filter(|&id| formation(id, 3, &peers) == Formation::Bootstrap).collect();
        assert_eq!(bootstrappers, vec![1]);
    }

    fn member(id: u64, voter: bool, live: bool) -> MemberView {
        MemberView {
            id,
            live,
            dead_for: if live { Duration::ZERO } else { Duration::from_secs(60) },
            voter,
            learner: !voter,
            caught_up: true,
            zone: None,
            stopping: false,
            free_vcpus: 4,
            free_mem_mib: 1024,
        }
    }

    const T: Duration = Duration::from_secs(10);

    #[test]
    fn new_nodes_become_learners_then_voters_up_to_three() {
        let mut m = vec![member(1, true, true), member(2, false, true)];
        m[1].learner = false;
        assert_eq!(plan_voters(&m, 1, T), Some(VoterChange::AddLearner(2)));
        m[1].learner = true;
        // Two nodes: one voter is the target.
        assert_eq!(plan_voters(&m, 1, T), None);
        m.push(member(3, false, true));
        assert_eq!(plan_voters(&m, 1, T), Some(VoterChange::Promote(2)));
        m[1].voter = true;
        m[1].learner = false;
        assert_eq!(plan_voters(&m, 1, T), Some(VoterChange::Promote(3)));
        m[2].voter = true;
        m[2].learner = false;
        m.push(member(4, false, true));
        m.push(member(5, false, true));
        assert_eq!(plan_voters(&m, 1, T), None, "5 nodes keep 3 voters");
        for id in 6..=7 {
            m.push(member(id, false, true));
        }
        assert!(matches!(plan_voters(&m, 1, T), Some(VoterChange::Promote(_))), "7 nodes want 5 voters");
    }

    #[test]
    fn a_dead_voter_is_replaced_by_the_learner_with_most_room_then_removed() {
        let mut m = vec![member(1, true, true), member(2, true, true), member(3, true, false)];
        m.push(member(4, false, true));
        m.push(member(5, false, true));
        m[4].free_mem_mib = 8192;
        m[4].stopping = true;
        assert_eq!(plan_voters(&m, 1, T), Some(VoterChange::Promote(4)), "not a node that is shutting down");
        m[4].stopping = false;
        assert_eq!(plan_voters(&m, 1, T), Some(VoterChange::Promote(5)));
        m[4].voter = true;
        m[4].learner = false;
        assert_eq!(plan_voters(&m, 1, T), Some(VoterChange::Remove(3)));
        // Not dead long enough: nothing happens.
        m[2].dead_for = Duration::from_secs(3);
        m[4].voter = false;
        m[4].learner = true;
        assert_eq!(plan_voters(&m, 1, T), None);
    }

    #[test]
    fn replacement_prefers_a_new_zone_and_skips_learners_that_lag() {
        let mut m = vec![member(1, true, true), member(2, true, true), member(3, true, false)];
        for (i, z) in ["a", "b"].iter().enumerate() {
            m[i].zone = Some(z.to_string());
        }
        let mut same_zone = member(4, false, true);
        same_zone.zone = Some("a".into());
        same_zone.free_mem_mib = 99_999;
        let mut new_zone = member(5, false, true);
        new_zone.zone = Some("c".into());
        let mut lagging = member(6, false, true);
        lagging.zone = Some("d".into());
        lagging.caught_up = false;
        m.extend([same_zone, new_zone, lagging]);
        assert_eq!(plan_voters(&m, 1, T), Some(VoterChange::Promote(5)));
    }

    #[test]
    fn leadership_moves_only_to_a_voter_with_clearly_more_room() {
        let mut m = vec![member(1, true, true), member(2, true, true), member(3, true, true), member(4, false, true)];
        assert_eq!(preferred_leader(&m, 1), None, "equal room: stay");
        m[1].free_mem_mib = 1200;
        assert_eq!(preferred_leader(&m, 1), None, "a little more room is not worth a transfer");
        m[2].free_mem_mib = 4096;
        m[3].free_mem_mib = 99_999;
        assert_eq!(preferred_leader(&m, 1), Some(3), "learners cannot lead");
        m[2].live = false;
        assert_eq!(preferred_leader(&m, 1), None);
    }

    #[test]
    fn a_leader_shutting_down_hands_over_to_a_voter_that_is_not() {
        let mut m = vec![member(1, true, true), member(2, true, true), member(3, true, true)];
        m[0].stopping = true;
        m[1].stopping = true;
        m[1].free_mem_mib = 99_999;
        assert_eq!(preferred_leader(&m, 1), Some(3), "to the one voter not shutting down, with no more room");
        m[2].caught_up = false;
        assert_eq!(preferred_leader(&m, 1), None, "a lagging voter would stall commits");
        m[0].stopping = false;
        m[2].caught_up = true;
        m[2].free_mem_mib = 99_999;
        m[1].free_mem_mib = 199_999;
        assert_eq!(preferred_leader(&m, 1), Some(3), "a roomier node shutting down is passed over");
    }

    #[test]
    fn without_a_learner_a_dead_voter_stays_and_dead_learners_go_later() {
        let m = vec![member(1, true, true), member(2, true, true), member(3, true, false)];
        assert_eq!(plan_voters(&m, 1, T), None);
        let mut m = vec![member(1, true, true), member(2, false, false)];
        m[1].dead_for = Duration::from_secs(15);
        assert_eq!(plan_voters(&m, 1, T), None);
        m[1].dead_for = Duration::from_secs(25);
        assert_eq!(plan_voters(&m, 1, T), Some(VoterChange::Remove(2)));
    }
}
