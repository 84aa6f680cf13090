//! What each command needs from the policy, and retrieve answers cut to the requester's view.
