-- Argo CD health check for relora.dev/AdapterMigration, in the order the operator's status
-- is meant to be read (conditions as written by relora_operator/planner.py):
--   generation != status.observedGeneration   -> Progressing (the operator has not caught up)
--   Suspended condition True                   -> Suspended
--   Failed or Stalled condition True           -> Degraded
--   Ready condition True                       -> Healthy
--   anything else                              -> Progressing
-- deploy/argocd/argocd-cm.yaml carries this file verbatim (a test checks it).
local hs = {}

local function condition(kind)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function holds(kind)
  local c = condition(kind)
  return c ~= nil and c.status == "True"
end

local function message(kind, fallback)
  local c = condition(kind)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    return c.message
  end
  return fallback
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to reconcile"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

if holds("Suspended") then
  hs.status = "Suspended"
  hs.message = message("Ready", "Suspended")
  return hs
end

if holds("Failed") or holds("Stalled") then
  hs.status = "Degraded"
  hs.message = message("Failed", message("Stalled", "An adapter failed"))
  return hs
end

if holds("Ready") then
  hs.status = "Healthy"
  hs.message = message("Ready", "Every adapter is ready")
  return hs
end

hs.status = "Progressing"
hs.message = message("Ready", "Migration in progress")
return hs
