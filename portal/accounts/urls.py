from django.contrib.auth import views as auth_views
from django.urls import path

from portal.accounts import views

app_name = "accounts"
urlpatterns = [
    path("login/", views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("team/", views.team_switch, name="team_switch"),
    path("members/", views.team_page, name="team"),
    path("members/<int:membership_id>/role", views.member_role, name="member_role"),
    path("members/<int:membership_id>/remove", views.member_remove, name="member_remove"),
    path("members/invite", views.invitation_create, name="invitation_create"),
    path("invite/<str:key>/", views.invitation_page, name="invitation"),
    path("tokens/", views.token_list, name="tokens"),
    path("tokens/<int:token_id>/revoke", views.token_revoke, name="token_revoke"),
    path("keys/", views.key_list, name="keys"),
    path("keys/<int:key_id>/revoke", views.key_revoke, name="key_revoke"),
]
