"""Small re-statements (our own code) of the upstream heads users swap out, quirks included, for parity tests.

FaceX-Zoo ``head/MV-Softmax.py`` (MV_Softmax) and ``head/CurricularFace.py``: W stored D x C, features used as
they come (not normalised), cos clamped to [-1, 1], in-place edits of the cos matrix, then the scale.
insightface ``recognition/arcface_torch``: ``PartialFC_V2`` (sample_rate 1: normalise both, F.linear, clamp) then
``CombinedMarginLoss`` (ArcFace path under no_grad: straight-through; CosFace path; interclass filtering).
"""
import math

import torch
import torch.nn.functional as F


def facexzoo_mv_softmax_logits(x, weight_dc, labels, is_am, margin=0.35, mv_weight=1.12, scale=32.0):
    kernel_norm = F.normalize(weight_dc, dim=0)
    cos_theta = torch.mm(x, kernel_norm).clamp(-1, 1)
    gt = cos_theta[torch.arange(labels.shape[0]), labels].view(-1, 1)
    if is_am:
        mask = cos_theta > gt - margin
        final_gt = torch.where(gt > margin, gt - margin, gt)
    else:
        sin_theta = torch.sqrt(1.0 - torch.pow(gt, 2))
        cos_theta_m = gt * math.cos(margin) - sin_theta * math.sin(margin)
        mask = cos_theta > cos_theta_m
        final_gt = torch.where(gt > 0, cos_theta_m, gt)
    hard_example = cos_theta[mask]
    cos_theta[mask] = mv_weight * hard_example + mv_weight - 1.0
    cos_theta.scatter_(1, labels.view(-1, 1), final_gt)
    return cos_theta * scale


def facexzoo_curricular_logits(x, kernel_dc, labels, t_buffer, m=0.5, s=64.0):
    kernel_norm = F.normalize(kernel_dc, dim=0)
    cos_theta = torch.mm(x, kernel_norm).clamp(-1, 1)
    target = cos_theta[torch.arange(labels.shape[0]), labels].view(-1, 1)
    sin_theta = torch.sqrt(1.0 - torch.pow(target, 2))
    cos_theta_m = target * math.cos(m) - sin_theta * math.sin(m)
    mask = cos_theta > cos_theta_m
    final_target = torch.where(target > math.cos(math.pi - m), cos_theta_m, target - math.sin(math.pi - m) * m)
    hard_example = cos_theta[mask]
    with torch.no_grad():
        t_buffer.copy_(target.mean() * 0.01 + (1 - 0.01) * t_buffer)
    cos_theta[mask] = hard_example * (t_buffer + hard_example)
    cos_theta.scatter_(1, labels.view(-1, 1).long(), final_target)
    return cos_theta * s


def insightface_partial_fc_logits(embeddings, weight_cd):
    return F.linear(F.normalize(embeddings), F.normalize(weight_cd)).clamp(-1, 1)


def insightface_combined_margin(logits, labels, s, m1, m2, m3, interclass_filtering_threshold=0.0):
    labels = labels.view(-1, 1)
    index_positive = torch.where(labels != -1)[0]
    if interclass_filtering_threshold > 0:
        with torch.no_grad():
            dirty = (logits > interclass_filtering_threshold).float()
            mask = torch.ones([index_positive.size(0), logits.size(1)], device=logits.device)
            mask.scatter_(1, labels[index_positive], 0)
            dirty[index_positive] *= mask
            tensor_mul = 1 - dirty
        logits = tensor_mul * logits
    target_logit = logits[index_positive, labels[index_positive].view(-1)]
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            target_logit.arccos_()
            logits.arccos_()
            final_target_logit = target_logit + m2
            logits[index_positive, labels[index_positive].view(-1)] = final_target_logit
            logits.cos_()
        logits = logits * s
    elif m3 > 0:
        final_target_logit = target_logit - m3
        logits[index_positive, labels[index_positive].view(-1)] = final_target_logit
        logits = logits * s
    else:
        raise ValueError("insightface raises here")
    return logits


def insightface_loss(embeddings, weight_cd, labels, s=64.0, m1=1.0, m2=0.5, m3=0.0, interclass_filtering_threshold=0.0):
    """PartialFC_V2 (sample_rate 1, one rank) + CombinedMarginLoss + DistCrossEntropy (mean over valid rows)."""
    logits = insightface_partial_fc_logits(embeddings, weight_cd)
    logits = insightface_combined_margin(logits, labels, s, m1, m2, m3, interclass_filtering_threshold)
    return F.cross_entropy(logits, labels.view(-1), ignore_index=-1)
