-- Argo CD health check for finetune.dev/FineTuneJob (resource.customizations.health.finetune.dev_FineTuneJob).
-- Reads status.phase and the kstatus conditions (Ready, Reconciling, Stalled) the operator writes.
-- Lua 5.1 (Argo CD runs gopher-lua): no goto, no integer division.
local hs = {}

local function condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

-- "Reason: message", from whatever of the two is there
local function describe(reason, message, fallback)
  if reason ~= nil and reason ~= "" and message ~= nil and message ~= "" then
    return reason .. ": " .. message
  end
  if message ~= nil and message ~= "" then
    return message
  end
  if reason ~= nil and reason ~= "" then
    return reason
  end
  return fallback
end

local status = obj.status
if status == nil or next(status) == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator"
  return hs
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
    .. " (status is for generation " .. tostring(status.observedGeneration) .. ")"
  return hs
end

local ready = condition(status, "Ready")
local reconciling = condition(status, "Reconciling")
local stalled = condition(status, "Stalled")
-- a spec change the running RayJob cannot take: the health stays the run's, the message says it
local ignored = condition(status, "SpecChangeIgnored")
local function with_ignored(message)
  if ignored ~= nil and ignored.status == "True" then
    return describe(ignored.reason, ignored.message, "SpecChangeIgnored")
  end
  return message
end

if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled.reason, stalled.message, "Stalled")
  return hs
end

if status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(status.reason, status.message, "Failed")
  return hs
end

if status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = with_ignored(describe(status.reason, status.message, "Suspended: spec.runPolicy.suspend is true"))
  return hs
end

if status.phase == "Succeeded" or (ready ~= nil and ready.status == "True") then
  hs.status = "Healthy"
  hs.message = describe(nil, status.message, "Succeeded")
  if ready ~= nil then
    hs.message = describe(nil, ready.message, hs.message)
  end
  hs.message = with_ignored(hs.message)
  return hs
end

hs.status = "Progressing"
if reconciling ~= nil and reconciling.status == "True" then
  hs.message = describe(reconciling.reason, reconciling.message, "Reconciling")
else
  hs.message = describe(status.reason, status.message, status.phase or "Waiting for the operator")
end
hs.message = with_ignored(hs.message)
return hs
