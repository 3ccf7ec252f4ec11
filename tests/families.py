"""Every member of the family as keyword arguments of mvloss.functional.margin_softmax_loss."""
FAMILIES = {
    "normface": dict(scale=30.0),
    "sphereface": dict(m1=4.0, scale=30.0, sphere_lambda=5.0),
    "sphereface_pure_psi": dict(m1=2.0, scale=16.0),
    "combined_general": dict(m1=1.5, m2=0.1, m3=0.05, scale=30.0),
    "cosface": dict(m3=0.35),
    "cosface_positive": dict(m3=0.35, cosface_fallback="positive"),
    "arcface": dict(m2=0.5),
    "arcface_easy": dict(m2=0.5, arc_fallback="easy"),
    "arcface_none": dict(m2=0.5, arc_fallback="none"),
    "arcface_straight_through": dict(m2=0.5, target_grad="straight_through"),
    "combined": dict(m2=0.3, m3=0.2),
    "mv_am_fixed": dict(m3=0.35, mv="fixed", t=0.2, scale=32.0),
    "mv_arc_adaptive": dict(m2=0.5, mv="adaptive", t=0.2, scale=32.0),
    "mv_arc_raw_mask": dict(m2=0.5, mv="adaptive", t=0.2, scale=32.0, mask_threshold="raw"),
    "sv_softmax": dict(mv="fixed", t=0.3, scale=32.0),
    "curricular": dict(m2=0.5, mv="curricular", t=0.3),
    "insightface_filter": dict(m2=0.5, preset="insightface", interclass_filtering_threshold=0.2),
    "insightface_cosface": dict(m3=0.4, preset="insightface"),
    "facexzoo_mv_arc": dict(m2=0.5, mv="adaptive", t=0.12, scale=32.0, preset="facexzoo"),
    "facexzoo_mv_am": dict(m3=0.35, mv="adaptive", t=0.12, scale=32.0, preset="facexzoo"),
    "facexzoo_curricular": dict(m2=0.5, mv="curricular", t=0.1, preset="facexzoo"),
    "focal": dict(m3=0.35, focal_gamma=2.0),
    "hard_mining": dict(m2=0.5, hard_ratio=0.6),
    "label_smoothing": dict(m2=0.5, mv="adaptive", t=0.2, label_smoothing=0.1),
    "unnormalized_x": dict(normalize_x=False, scale=2.0, m3=0.2),
    "clamped": dict(m2=0.5, clamp_cos=True),
}


def needs_unit_features(kw):
    """Families that use raw features as cosines (FaceX-Zoo) want inputs of norm < 1 to be meaningful."""
    return kw.get("preset") == "facexzoo" or kw.get("normalize_x") is False
